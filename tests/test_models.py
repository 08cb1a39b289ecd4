"""M2 networks, checkpoints and the model registry on tiny inputs."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_pathoseg.errors import CheckpointError, PathosegError
from napari_pathoseg.models.checkpoint import load_checkpoint, read_header, save_checkpoint
from napari_pathoseg.methods.nuclei.attcycle import (
    PRESETS,
    AttentionGate,
    Generator,
    M2Config,
    M2Model,
    build_encoder,
    get_preset,
    register_encoder,
)
from napari_pathoseg.models.registry import NucleusModel, list_models, load_model, register_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(preset: str = "attcycle-lite", **kw) -> M2Config:
    """The preset's structure with small widths (same number of levels)."""
    base = PRESETS[preset]
    n = len(base.widths)
    kw.setdefault("widths", tuple(4 * 2**i for i in range(n)))
    kw.setdefault("disc_width", 4)
    kw.setdefault("tile_size", 2 ** (n - 1) * 2)
    return dataclasses.replace(base, **kw)


class _ModelChecks:
    """Shared forward/backward checks; subclasses name the preset."""

    preset = "attcycle-lite"

    def test_generator_forward_backward(self):
        torch.manual_seed(0)
        cfg = tiny(self.preset)
        g = Generator(cfg)
        side = 2 ** (len(cfg.widths) - 1) * 2
        x = torch.rand(2, 3, side, side) * 2 - 1
        rgb, seg = g(x)
        assert rgb.shape == (2, 3, side, side)
        assert seg.shape == (2, cfg.seg_channels, side, side)
        assert rgb.abs().max() <= 1.0
        (rgb.mean() + seg.mean()).backward()
        grads = [p.grad for p in g.parameters() if p.requires_grad]
        assert all(gr is not None for gr in grads)
        assert any(gr.abs().sum() > 0 for gr in grads)

    def test_discriminator_and_model(self):
        cfg = tiny(self.preset)
        model = M2Model(cfg)
        side = 32
        d = model.D_Y(torch.rand(1, 3, side, side))
        assert d.ndim == 4 and d.shape[:2] == (1, 1)
        d.mean().backward()
        assert {"G_X2Y", "G_Y2X", "D_X", "D_Y"} <= set(dict(model.named_children()))


class TestAttCycleLite(_ModelChecks):
    preset = "attcycle-lite"


class TestAttCycle(_ModelChecks):
    preset = "attcycle"


def test_presets_structure():
    lite, full = PRESETS["attcycle-lite"], PRESETS["attcycle"]
    assert full.widths == (64, 128, 256, 512, 1024) and full.tile_size == 256
    assert lite.encoder == full.encoder == "attunet"
    assert lite.attention and full.attention
    with pytest.raises(PathosegError, match="valid presets"):
        get_preset("nope")


def test_attention_gate_math():
    torch.manual_seed(1)
    gate = AttentionGate(f_l=3, f_g=5, f_int=2)
    x = torch.rand(1, 3, 4, 4)
    g = torch.rand(1, 5, 4, 4)  # same grid: no resampling
    wx = gate.w_x.weight[:, :, 0, 0]  # (F_int, F_l)
    wg = gate.w_g.weight[:, :, 0, 0]  # (F_int, F_g)
    bg = gate.w_g.bias
    psi = gate.psi.weight[0, :, 0, 0]  # (F_int,)
    bpsi = gate.psi.bias[0]
    xs = x[0].reshape(3, -1)  # (F_l, HW)
    gs = g[0].reshape(5, -1)
    q = psi @ torch.relu(wx @ xs + wg @ gs + bg[:, None]) + bpsi  # (HW,)
    alpha = torch.sigmoid(q).reshape(1, 1, 4, 4)
    torch.testing.assert_close(gate.coefficients(x, g), alpha)
    torch.testing.assert_close(gate(x, g), x * alpha)


def test_attention_gate_upsamples_gating():
    gate = AttentionGate(4, 8, 2)
    out = gate(torch.rand(1, 4, 8, 8), torch.rand(1, 8, 4, 4))
    assert out.shape == (1, 4, 8, 8)


def test_pluggable_encoder():
    class Enc(torch.nn.Module):
        out_channels = (5, 7)

        def __init__(self, cfg):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 5, 3, padding=1)
            self.b = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1)

        def forward(self, x):
            f0 = self.a(x)
            return [f0, self.b(f0)]

    register_encoder("test-enc", Enc)
    cfg = M2Config(encoder="test-enc", widths=(5, 7), tile_size=8, decoder_widths=(6,))
    g = Generator(cfg)
    rgb, seg = g(torch.rand(1, 3, 8, 8))
    assert rgb.shape == (1, 3, 8, 8) and seg.shape == (1, 2, 8, 8)
    with pytest.raises(PathosegError, match="registered kinds"):
        build_encoder(M2Config(encoder="no-such-encoder"))


def test_config_roundtrip_and_validation():
    cfg = PRESETS["attcycle-lite"]
    assert M2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(CheckpointError, match="unknown keys"):
        M2Config.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(PathosegError, match="divisible"):
        M2Config(widths=(4, 8, 16), tile_size=30)


def _save_tiny(path, cfg=None, meta=None):
    cfg = cfg or tiny()
    torch.manual_seed(0)
    model = M2Model(cfg)
    sd = {n: getattr(model, n).state_dict() for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")}
    save_checkpoint(path, sd, cfg.to_dict(), meta or {"note": "test"})
    return model, cfg


def test_checkpoint_roundtrip(tmp_path):
    path = tmp_path / "m.safetensors"
    model, cfg = _save_tiny(path)
    tensors, config, meta = load_checkpoint(path, expected_kind="m2")
    assert config == cfg.to_dict() and meta == {"note": "test"}
    for k, v in model.G_X2Y.state_dict().items():
        torch.testing.assert_close(tensors["G_X2Y"][k], v)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind
    with pytest.raises(CheckpointError, match="expected 'other'"):
        load_checkpoint(path, expected_kind="other")


def test_pickle_refused(tmp_path):
    p1 = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2)}, p1)  # zip archive with a pickle inside
    p2 = tmp_path / "evil.safetensors"
    p2.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    for p in (p1, p2):
        with pytest.raises(CheckpointError, match="never unpickles"):
            load_checkpoint(p, expected_kind="m2")
        with pytest.raises(CheckpointError, match="never unpickles"):
            load_model(p)


def test_foreign_safetensors_refused(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="without napari-pathoseg metadata"):
        read_header(p)


def test_config_mismatch_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    model, cfg = _save_tiny(path)
    # weights of a 4-wide model stored under a config claiming 8-wide layers
    bad = dataclasses.replace(cfg, widths=tuple(2 * w for w in cfg.widths))
    sd = {n: getattr(model, n).state_dict() for n in ("G_X2Y", "G_Y2X", "D_X", "D_Y")}
    save_checkpoint(tmp_path / "bad.safetensors", sd, bad.to_dict(), {})
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model(tmp_path / "bad.safetensors")
    # missing generator tensors
    save_checkpoint(tmp_path / "nog.safetensors", {"D_X": sd["D_X"]}, cfg.to_dict(), {})
    with pytest.raises(CheckpointError, match="no G_X2Y"):
        load_model(tmp_path / "nog.safetensors")


def test_load_model_predict(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    model = load_model(path, device="cpu")
    assert isinstance(model, NucleusModel)
    assert model.mpp == 0.5 and model.tile_size == tiny().tile_size
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 21, 19, 3), dtype=np.uint8)  # not a multiple of 8
    out = model.predict(batch)
    assert out["prob"].shape == (2, 21, 19) and out["prob"].dtype == np.float32
    assert out["normalized"].shape == (2, 21, 19, 3) and out["normalized"].dtype == np.uint8
    assert out["extra"].shape == (2, 1, 21, 19)
    assert ((out["prob"] >= 0) & (out["prob"] <= 1)).all()
    lab = model.to_instances(out["prob"][0], out["extra"][0])
    assert lab.shape == (21, 19) and lab.dtype == np.int32
    with pytest.raises(PathosegError, match="RGB"):
        model.predict(np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(PathosegError, match="uint8"):
        model.predict(np.zeros((1, 8, 8, 3), np.float32))


def test_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHOSEG_HOME", str(tmp_path / "home"))
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    entry = register_model(path, name="mine", base="nuclei-lite", data="test", scores={"aji": 0.1})
    assert entry["name"] == "mine"
    names = [m["name"] for m in list_models()]
    assert "mine" in names
    assert load_model("mine").name == "mine"
    with pytest.raises(CheckpointError, match="valid names"):
        load_model("no-such-model")


def test_shipped_model_loads():
    from napari_pathoseg.models.registry import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "nuclei-lite.safetensors").is_file():
        pytest.skip("shipped weights not present in this checkout")
    model = load_model("nuclei-lite", device="cpu")
    assert model.config.preset == "attcycle-lite"
    out = model.predict(np.full((1, 64, 64, 3), 230, np.uint8))
    assert out["prob"].shape == (1, 64, 64)
    assert any(m["name"] == "nuclei-lite" and m["shipped"] for m in list_models())
