"""Tests of the TransCycle student encoder (ResNet-50 + Transformer)."""

from __future__ import annotations

import pytest
import torch

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.methods.nuclei.transcycle import (
    TRANSCYCLE_PRESETS,
    TransCycleEncoder,
    TransCycleEncoderConfig,
    build_transcycle_encoder,
)

LITE = TRANSCYCLE_PRESETS["transcycle-lite"]


@pytest.fixture
def lite_encoder():
    torch.manual_seed(0)
    return TransCycleEncoder(LITE)


def test_forward_shapes_follow_the_encoder_contract(lite_encoder):
    x = torch.rand(2, 3, 64, 64)
    feats = lite_encoder(x)
    assert len(feats) == len(lite_encoder.out_channels) == 6
    for i, (f, c) in enumerate(zip(feats, lite_encoder.out_channels)):
        assert f.shape == (2, c, 64 // 2**i, 64 // 2**i)
        assert torch.isfinite(f).all()


@pytest.mark.parametrize(("h", "w"), [(32, 32), (96, 64), (256, 160)])
def test_any_size_divisible_by_stride(lite_encoder, h, w):
    # the positional embedding is learned for 256 // 32 = 8x8 tokens; other grids interpolate
    feats = lite_encoder(torch.rand(2, 3, h, w))
    assert feats[-1].shape[-2:] == (h // 32, w // 32)
    assert feats[0].shape[-2:] == (h, w)


def test_positional_embedding_matters_and_is_interpolated(lite_encoder):
    lite_encoder.eval()
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = lite_encoder(x)[-1].clone()
        lite_encoder.pos_embed.add_(torch.randn_like(lite_encoder.pos_embed))
        after = lite_encoder(x)[-1]
    assert not torch.allclose(before, after)


def test_backward_reaches_every_parameter(lite_encoder):
    x = torch.rand(2, 3, 64, 64)
    loss = sum(f.float().pow(2).mean() for f in lite_encoder(x))
    loss.backward()
    missing = [n for n, p in lite_encoder.named_parameters() if p.grad is None]
    assert missing == []
    assert lite_encoder.pos_embed.grad.abs().sum() > 0
    assert lite_encoder.stages[0][0].conv1.weight.grad.abs().sum() > 0


def test_rejects_sizes_not_divisible_by_stride(lite_encoder):
    with pytest.raises(PathosegError, match="multiple of its stride 32"):
        lite_encoder(torch.rand(1, 3, 48, 64))
    with pytest.raises(PathosegError, match=r"\(B, 3, H, W\)"):
        lite_encoder(torch.rand(1, 1, 64, 64))


def test_method_preset_is_resnet50_with_vit_base_transformer():
    cfg = TRANSCYCLE_PRESETS["transcycle"]
    assert cfg.blocks == (3, 4, 6, 3)
    assert (cfg.hidden, cfg.layers, cfg.heads) == (768, 12, 12)
    # ResNet-50 stage widths 256, 512, 1024, 2048
    assert [cfg.base_width * 2**i * cfg.expansion for i in range(4)] == [256, 512, 1024, 2048]
    enc = TransCycleEncoder(cfg)
    assert len(enc.transformer.layers) == 12
    assert enc.stages[3][0].conv3.out_channels == 2048
    assert [len(s) for s in enc.stages] == [3, 4, 6, 3]


def test_factory_picks_preset_from_an_m2_like_config():
    class Cfg:
        preset = "transcycle-lite"
        tile_size = 128

    enc = build_transcycle_encoder(Cfg())
    assert enc.config.hidden == 64 and enc.pos_grid == 4
    assert build_transcycle_encoder("transcycle-lite").config == LITE


def test_config_validation_and_round_trip():
    assert TransCycleEncoderConfig.from_dict(LITE.to_dict()) == LITE
    with pytest.raises(PathosegError, match="divisible by heads"):
        TransCycleEncoderConfig(hidden=65, heads=4)
    with pytest.raises(PathosegError, match="Unknown TransCycle"):
        TransCycleEncoderConfig.from_dict({"depth": 3})


def test_registered_with_m2_and_student_generator_trains():
    from napari_pathoseg.methods.nuclei import attcycle as m2

    assert "resnet50_transformer" in m2.encoder_kinds()
    cfg = m2.get_preset("transcycle-lite")
    assert cfg.encoder == "resnet50_transformer"
    torch.manual_seed(0)
    gen = m2.Generator(cfg)
    assert isinstance(gen.encoder, TransCycleEncoder)
    assert gen.encoder.pos_grid == cfg.tile_size // 32
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    rgb, seg = gen(x)
    assert rgb.shape == (2, 3, 64, 96) and seg.shape == (2, cfg.seg_channels, 64, 96)
    (rgb.abs().mean() + seg.mean()).backward()
    assert gen.encoder.pos_embed.grad is not None
    # the one preset table holds the student presets with the widths of this encoder
    for name in ("transcycle", "transcycle-lite"):
        assert m2.PRESETS[name].widths == TRANSCYCLE_PRESETS[name].out_channels
        assert m2.PRESETS[name].encoder == "resnet50_transformer"
    with pytest.raises(PathosegError, match="transcycle-lite"):
        m2.get_preset("transcycle_lite")
