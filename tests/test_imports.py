"""The core never imports Qt or napari; every manifest target imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path


PKG = Path(__file__).resolve().parents[1] / "src" / "napari_pathoseg"


def _core_modules():
    mods = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if "_widgets" in parts or parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def test_core_is_qt_free():
    code = (
        "import sys, importlib\n"
        f"mods = {_core_modules()!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PySide2', 'PySide6', 'magicgui') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"


def test_manifest_valid_and_targets_import():
    from npe2 import PluginManifest

    mf = PluginManifest.from_file(PKG / "napari.yaml")
    for cmd in mf.contributions.commands:
        mod, _, attr = cmd.python_name.partition(":")
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), cmd.python_name


def test_new_core_packages_are_checked_too():
    """The Qt-free check walks the whole package: new modules (CLI driver, engines) are in it."""
    mods = _core_modules()
    assert "napari_pathoseg.cli._driver" in mods and "napari_pathoseg.cli.slide" in mods
    for p in sorted(PKG.rglob("*.py")):
        if "_widgets" in p.parts or p.name == "__main__.py":
            continue
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        assert ".".join(parts[:-1] if parts[-1] == "__init__" else parts) in mods


def test_only_widgets_import_qt_in_source():
    """No module outside _widgets/ even mentions a Qt/napari GUI import (also lazily, inside functions)."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+(qtpy|PyQt5|PyQt6|PySide2|PySide6|magicgui|napari)\b", re.M)
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "_widgets" not in p.parts and pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == [], offenders
