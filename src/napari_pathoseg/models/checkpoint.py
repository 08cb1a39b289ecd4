"""Checkpoint I/O: safetensors tensors + JSON config/metadata, never pickles.

A checkpoint is one ``.safetensors`` file.  Its tensors are the state dicts
of named modules flattened as ``"<module>.<parameter>"``; its safetensors
header metadata holds three JSON strings: ``kind`` (architecture family,
e.g. ``"m2"``), ``config`` and ``meta`` (training info, scores, ...).
Writes are atomic (:mod:`napari_pathoseg._atomic`).

Reading is defensive, because checkpoints travel between people: a pickle is refused before
anything is parsed; the config is checked against its architecture's schema
(:func:`napari_pathoseg.models.tasks.validate_config`: known keys, bounds, network size) before
any caller builds a network from it; tensors holding NaN/Inf are refused; and
:func:`load_state_strict` refuses weights whose names, shapes or dtypes do not fit the model.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from napari_pathoseg._atomic import atomic_path
from napari_pathoseg.errors import CheckpointError
from napari_pathoseg.models.tasks import validate_config
from napari_pathoseg.models.validation import check_finite

if TYPE_CHECKING:  # torch is imported where tensors are handled: listing models needs no torch
    import torch

__all__ = ["save_checkpoint", "load_checkpoint", "load_network", "read_header", "split_state", "load_state_strict", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def save_checkpoint(
    path: str | os.PathLike,
    state_dicts: dict[str, dict[str, torch.Tensor]],
    config: dict[str, Any],
    meta: dict[str, Any] | None = None,
    *,
    kind: str = "m2",
) -> Path:
    """Save module state dicts with a JSON config and metadata, atomically.

    Parameters
    ----------
    path : path
        Target ``.safetensors`` file.
    state_dicts : dict
        ``{module name: state_dict}``; names must not contain ``"."``.
    config : dict
        JSON-serialisable model config (e.g. ``M2Config.to_dict()``).
    meta : dict or None
        JSON-serialisable metadata.
    kind : str
        Architecture family checked by :func:`load_checkpoint`.

    Returns
    -------
    pathlib.Path
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    flat: dict[str, torch.Tensor] = {}
    for module, sd in state_dicts.items():
        if "." in module:
            raise CheckpointError(f"Module name {module!r} must not contain '.'.")
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{module}.{key} is {type(t).__name__}, not a tensor; store it in meta.")
            flat[f"{module}.{key}"] = t.detach().to("cpu").contiguous()
    header = {
        "format": "napari-pathoseg",
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    with atomic_path(path, create_parent=True) as tmp:
        save_file(flat, str(tmp), metadata=header)
    return path


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] in _PICKLE_MAGIC or zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is a pickle / torch.save archive; napari-pathoseg never unpickles files "
            "(they can run code). Convert it to safetensors with a trusted script, or use a "
            "checkpoint written by napari-pathoseg."
        )


def read_header(path: str | os.PathLike, *, validate: bool = True) -> dict[str, Any]:
    """Read only the JSON header of a checkpoint: ``{"kind", "config", "meta", "keys"}``.

    Parameters
    ----------
    path : path
    validate : bool
        Check the config against the schema of its architecture (known keys, value bounds,
        network size) so that no caller builds a network from a crafted config. ``False``
        only for listings that never build anything.

    Raises
    ------
    CheckpointError
        A missing file, a pickle, a foreign or damaged file, or a config out of its schema.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; give a .safetensors file or a model name.")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            md = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {exc}.") from exc
    if md.get("format") != "napari-pathoseg":
        raise CheckpointError(
            f"{path} is a safetensors file without napari-pathoseg metadata (kind/config); "
            "it was not written by save_checkpoint."
        )
    try:
        config = json.loads(md["config"])
        meta = json.loads(md.get("meta", "{}"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged JSON metadata ({exc}).") from exc
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged metadata (config and meta must be JSON objects).")
    if validate:
        validate_config(md.get("kind"), config, where=str(path))
    return {"kind": md.get("kind"), "config": config, "meta": meta, "keys": keys}


def load_checkpoint(
    path: str | os.PathLike, *, expected_kind: str = "m2", validate: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : path
    expected_kind : str
        Architecture family the caller builds.
    validate : bool
        Check the config (see :func:`read_header`) and refuse NaN/Inf tensors.

    Returns
    -------
    tensors : dict
        ``{module name: state_dict}`` (CPU tensors).
    config : dict
    meta : dict

    Raises
    ------
    CheckpointError
        For a pickle, a foreign/damaged file, a different ``kind``, a config out of its
        schema, or non-finite tensors.
    """
    path = Path(path)
    header = read_header(path, validate=validate)
    if header["kind"] != expected_kind:
        raise CheckpointError(
            f"{path} holds a {header['kind']!r} model, expected {expected_kind!r}; "
            "pick a checkpoint of the right architecture."
        )
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}.") from exc
    if validate:
        check_finite(flat, where=str(path))
    return split_state(flat), header["config"], header["meta"]


def split_state(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Undo the ``"<module>.<key>"`` flattening."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        module, _, key = k.partition(".")
        out.setdefault(module, {})[key] = t
    return out


def _dtype_fits(own: torch.Tensor, got: torch.Tensor) -> bool:
    import torch

    if own.is_floating_point():
        return got.is_floating_point()
    if own.dtype == torch.bool:
        return got.dtype == torch.bool
    return not (got.is_floating_point() or got.is_complex() or got.dtype == torch.bool)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str, path) -> None:
    """``module.load_state_dict(state)`` with a CheckpointError naming what does not fit.

    Refuses missing and unexpected keys, other shapes, and other dtypes (integer or boolean
    values where the model has floating-point weights, and the reverse).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if bad:
            details.append(
                f"shape mismatch {bad[0]}: file {tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}"
            )
        raise CheckpointError(
            f"{path}: {what} does not match its config ({'; '.join(details)}). "
            "The file is damaged or was edited; use the original checkpoint."
        )
    wrong = [k for k in own if not _dtype_fits(own[k], state[k])]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: {what}.{k} holds {str(state[k].dtype).replace('torch.', '')} values where the model has "
            f"{str(own[k].dtype).replace('torch.', '')}; the file is damaged or was edited: use the original checkpoint."
        )
    module.load_state_dict(state, strict=True)


def load_network(
    path: str | os.PathLike,
    *,
    kind: str,
    validate: Any,
    build: Any,
    what: str,
    key: str = "net",
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load a one-network checkpoint of ``kind``: ``(module, config, meta)``.

    The shared body of the method loaders (lesion, tissue): read the checkpoint (pickles
    refused, header and finite weights checked), ``validate(config_dict, where=path)`` into the
    method's config, ``build(config)`` the network and load the ``key`` tensors strictly.
    ``what`` names the model in the error when those tensors are missing ("an M3 lesion model").

    Raises
    ------
    CheckpointError
        A pickle, another architecture, a config out of its schema, NaN/Inf weights, or
        weights that do not fit the stored config.
    """
    path = Path(path)
    tensors, config_d, meta = load_checkpoint(path, expected_kind=kind)
    config = validate(config_d, where=str(path))
    if key not in tensors:
        raise CheckpointError(f"{path} has no {key!r} weights; it is not {what}.")
    net = build(config)
    load_state_strict(net, tensors[key], what=key, path=path)
    return net, config, meta
