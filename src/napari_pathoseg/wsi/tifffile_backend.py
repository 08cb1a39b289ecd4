"""The tifffile back end: OME-TIFF and the TIFFs OpenSlide refuses.

:func:`open_tifffile` reads the first series of a TIFF as a lazy pyramid through tifffile's
zarr store (one dask chunk per file tile), squeezing extra axes and compositing alpha onto
white; levels coarser than the file's are added lazily. µm per pixel comes from the OME
``PhysicalSize`` or the TIFF resolution tags (writer defaults such as 72 dpi are ignored).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_pathoseg.errors import SlideError
from napari_pathoseg.wsi.levels import composite_white, lazy_levels, to_rgb_uint8
from napari_pathoseg.wsi.metadata import SlideMetadata, SlideParts, check_dimensions, float_or_none

__all__ = ["open_tifffile", "tiff_mpp"]

logger = logging.getLogger(__name__)


def tiff_mpp(tif: Any, page: Any) -> tuple[float | None, float | None]:
    """µm/px ``(x, y)`` from OME PhysicalSize or TIFF resolution tags (None when unknown)."""
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
            for el in root.iter():
                if el.tag.endswith("Pixels"):
                    unit_x = el.get("PhysicalSizeXUnit", "µm")
                    fx = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit_x, 1.0)
                    unit_y = el.get("PhysicalSizeYUnit", "µm")
                    fy = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit_y, 1.0)
                    x = float_or_none(el.get("PhysicalSizeX"))
                    y = float_or_none(el.get("PhysicalSizeY"))
                    return (x * fx if x else None, y * fy if y else None)
        except ET.ParseError:
            logger.warning("%s: unreadable OME-XML; resolution unknown", tif.filehandle.path)
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    unit_v = int(unit.value) if unit is not None else 2
    per_um = {2: 25400.0, 3: 10000.0}.get(unit_v)  # inch, cm
    if per_um is None:
        return (None, None)
    out = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            out.append(None)
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        res = float_or_none(num / den if den else None)
        # 1 px/unit (or 72 dpi) is a writer default, not a physical resolution
        if res is None or res <= 1.0 or (unit_v == 2 and abs(res - 72) < 1e-6):
            out.append(None)
        else:
            out.append(per_um / res)
    return (out[0], out[1])


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """(r, c, 4) uint8 CMYK (ink amounts) -> (r, c, 3) uint8 RGB: ``R = 255 (1 - C) (1 - K)``."""
    ink = cmyk[..., :4].astype(np.float32) / 255.0
    rgb = 255.0 * (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _colour_layout(path: Path, page: Any) -> bool:
    """True for a CMYK page (converted to RGB); SlideError for extra channels of unknown meaning."""
    photometric = int(getattr(page, "photometric", 2) or 0)
    samples = int(getattr(page, "samplesperpixel", 1) or 1)
    extra = tuple(int(e) for e in (getattr(page, "extrasamples", ()) or ()))
    if photometric == 5:  # SEPARATED
        inkset = page.tags.get("InkSet")
        if samples == 4 and (inkset is None or int(inkset.value) == 1):
            return True
        raise SlideError(f"{path}: a separated (ink) image with {samples} channels that are not CMYK is not supported; convert it to RGB")
    if photometric not in (0, 1, 2, 6):  # min-is-white, min-is-black, RGB, YCbCr
        raise SlideError(f"{path}: TIFF photometric interpretation {photometric} is not supported; convert it to 8-bit RGB")
    if samples > 3 and (photometric == 2 and (len(extra) != samples - 3 or any(e not in (1, 2) for e in extra))):
        raise SlideError(
            f"{path}: {samples} channels per pixel, the extra ones not marked as alpha (ExtraSamples {list(extra)}); "
            "only RGB or RGB + alpha is supported: save it as RGB"
        )
    return False


def open_tifffile(path: Path) -> SlideParts:
    """Open the first image series of a TIFF (OME-TIFF included) as a lazy pyramid.

    Raises
    ------
    SlideError
        The file is not a readable TIFF, holds no image, is not 8-bit RGB(A), or claims
        absurd dimensions.
    """
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(str(path))
    except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
        raise SlideError(f"{path}: not a readable TIFF ({exc}); the file is corrupt, truncated or not a slide") from exc
    try:
        if not tif.series:
            raise SlideError(f"{path}: the TIFF holds no image")
        series = tif.series[0]
        levels_src = list(series.levels)
        page0 = levels_src[0].keyframe
        shape0 = levels_src[0].shape
        axes = levels_src[0].axes
        if "S" not in axes and len(shape0) != 2:
            raise SlideError(f"{path}: unsupported TIFF layout (axes {axes!r}); expected an RGB image")
        dims = []
        for lv in levels_src:
            ax = lv.axes
            h = lv.shape[ax.index("Y")]
            w = lv.shape[ax.index("X")]
            dims.append((int(w), int(h)))
        check_dimensions(path, dims)
        if page0.dtype != np.uint8:
            raise SlideError(
                f"{path}: pixel type {page0.dtype} is not supported (8-bit RGB brightfield slides only)"
            )
        cmyk = _colour_layout(path, page0)
        arrays = []
        for i, lv in enumerate(levels_src):
            store = tif.aszarr(series=0, level=i)
            z = zarr.open(store, mode="r")
            a = da.from_zarr(z)
            ax = lv.axes
            # squeeze to Y X S
            for name in [c for c in ax if c not in "YXS"]:
                idx = ax.index(name)
                if a.shape[idx] != 1:
                    a = da.take(a, 0, axis=idx)
                else:
                    a = a.squeeze(axis=idx)
                ax = ax.replace(name, "")
            if "S" not in ax:
                a = da.stack([a, a, a], axis=-1)
            elif ax.index("S") == 0:
                a = da.moveaxis(a, 0, -1)
            if cmyk:
                a = a.map_blocks(cmyk_to_rgb, dtype=np.uint8, chunks=a.chunks[:2] + ((3,),))
            elif a.shape[-1] == 4:
                a = a.map_blocks(composite_white, dtype=np.uint8, chunks=a.chunks[:2] + ((3,),))
            elif a.shape[-1] != 3:
                raise SlideError(f"{path}: expected RGB, got {a.shape[-1]} samples per pixel")
            arrays.append(a)
        base_levels = len(arrays)
        extra = lazy_levels(arrays[-1])[1:]
        arrays.extend(extra)
        for e in extra:
            dims.append((int(e.shape[1]), int(e.shape[0])))
        mpp_x, mpp_y = tiff_mpp(tif, page0)
        tile = (int(page0.tilelength), int(page0.tilewidth)) if page0.is_tiled else None
        assoc: dict[str, int] = {}
        for k, s in enumerate(tif.series[1:], start=1):
            if s.name and s.name.lower() in ("label", "macro", "thumbnail"):
                assoc[s.name.lower()] = k
        fmt = "ome-tiff" if tif.is_ome else ("svs" if tif.is_svs else "tiff")
        props = {}
        desc = page0.description
        if desc:
            props["tiff.ImageDescription"] = desc[:2000]
    except SlideError:
        tif.close()
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on corrupt files
        tif.close()
        raise SlideError(f"{path}: cannot read this TIFF ({type(exc).__name__}: {exc})") from exc

    def associated(name: str) -> np.ndarray:
        return to_rgb_uint8(tif.series[assoc[name]].asarray(), source=f"{path}:{name}")

    downs = tuple(dims[0][1] / float(h) for (_, h) in dims)
    meta = SlideMetadata(
        path=str(path),
        format=fmt,
        vendor="ome" if tif.is_ome else None,
        level_dimensions=tuple(dims),
        level_downsamples=downs,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=None,
        associated_images=tuple(sorted(assoc)),
        tile_size=tile,
        properties=props,
    )
    logger.debug("%s: %d file levels, %d computed", path, base_levels, len(extra))
    return SlideParts(metadata=meta, pyramid=arrays, closer=tif.close, associated=associated)
