"""The one atomic-write helper: temp file + rename, umask, cleanup, refusing outputs that are inputs."""

from __future__ import annotations

import os
import stat
import time

import pytest

from napari_pathoseg import _atomic as A


def _temps(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(A.TMP_SUFFIX)]


def test_write_replaces_only_when_complete(tmp_path):
    out = tmp_path / "table.csv"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with A.atomic_open(out) as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert out.read_text() == "old"
    assert _temps(tmp_path) == []
    A.write_text(out, "new")
    assert out.read_text() == "new"
    assert _temps(tmp_path) == []


def test_keyboard_interrupt_leaves_no_temp(tmp_path):
    out = tmp_path / "x.bin"
    with pytest.raises(KeyboardInterrupt):
        with A.atomic_path(out) as tmp:
            tmp.write_bytes(b"abc")
            raise KeyboardInterrupt
    assert not out.exists()
    assert _temps(tmp_path) == []


def test_final_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = A.write_bytes(tmp_path / "a.bin", b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_missing_folder_is_refused_or_created(tmp_path):
    with pytest.raises(A.OutputError, match="does not exist"):
        A.write_json(tmp_path / "nope" / "a.json", {"a": 1})
    p = A.write_json(tmp_path / "made" / "a.json", {"a": 1}, create_parent=True)
    assert p.read_text().startswith("{")


def test_stale_temps_of_killed_runs_are_cleaned(tmp_path):
    out = tmp_path / "labels.tif"
    stale = tmp_path / f".labels.tif.abc123{A.TMP_SUFFIX}"
    fresh = tmp_path / f".labels.tif.def456{A.TMP_SUFFIX}"
    other = tmp_path / f".other.tif.abc123{A.TMP_SUFFIX}"
    for p in (stale, fresh, other):
        p.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    A.write_bytes(out, b"data")
    assert not stale.exists()
    assert fresh.exists()  # may belong to a run still going
    assert other.exists()  # another destination's


def test_check_output_refuses_inputs_also_through_links(tmp_path):
    src = tmp_path / "slide.svs"
    src.write_bytes(b"slide")
    link = tmp_path / "link.svs"
    link.symlink_to(src)
    hard = tmp_path / "hard.svs"
    os.link(src, hard)
    for out in (src, link, hard, tmp_path / "." / "slide.svs"):
        with pytest.raises(A.OutputError, match="is also an input"):
            A.check_output(out, inputs=[src], what="--out")
    assert src.read_bytes() == b"slide"
    assert A.check_output(tmp_path / "new.json", inputs=[src, None]) == tmp_path / "new.json"


def test_check_output_refuses_folders_and_existing_without_overwrite(tmp_path):
    with pytest.raises(A.OutputError, match="is a folder"):
        A.check_output(tmp_path)
    f = tmp_path / "a.txt"
    f.write_text("keep")
    with pytest.raises(A.OutputError, match="already exists"):
        A.check_output(f, overwrite=False)
    assert A.check_output(f) == f


def test_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(A.OutputError, match="no space left"):
        A.write_text(tmp_path / "a.txt", "x")
    assert _temps(tmp_path) == []
