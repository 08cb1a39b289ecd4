"""Try napari-pathoseg as a hostile user would and count what happens (JSON on stdout).

Every case runs in this process (a ``pathoseg`` command through :func:`napari_pathoseg.cli.main.main`,
or a library entry point) under a time limit, in a scratch folder that holds its inputs and one
output folder per case. Each case is classified:

* ``clean``: refused with a project error (exit 2 or 130 and exactly one stderr line reporting
  it, after any progress lines; or a :class:`~napari_pathoseg.errors.PathosegError` from the library);
* ``ok``: it worked (exit 0, or the library call returned) where working is acceptable;
* ``traceback``: any other exception, a multi-line or traceback-looking stderr, or another exit code;
* ``hang``: still running at the time limit (each case runs in a forked child, killed then);
* ``wrong``: it worked where it must refuse (e.g. an output naming an input was written).

Independently of the outcome, every input file is hashed before and after (``inputs_lost``
counts changed or removed inputs), temporary files left in the case's output folder and files
written outside it are counted.

Usage::

    python scripts/hostile_inputs.py            # all cases, JSON summary
    python scripts/hostile_inputs.py --details  # one record per case too
    python scripts/hostile_inputs.py --only geojson --timeout 30
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable


sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_cases import CASES, full_disk, make_inputs, unmount_full  # noqa: E402

from napari_pathoseg.errors import PathosegError  # noqa: E402


def _digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = _digest(p)
    return out


def _classify(fn: Callable[..., Any], ctx: dict[str, Any], err_path: Path) -> dict[str, Any]:
    """Run ``fn(ctx)`` (in the forked child) with stdout/stderr on files; the outcome record."""
    rec: dict[str, Any] = {}
    out_fd = os.open(os.devnull, os.O_WRONLY)
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
    try:
        value = fn(ctx)
        if isinstance(value, int) and not isinstance(value, bool):  # a CLI exit code
            rec["exit"] = value
        rec["outcome"] = "ok"
    except PathosegError as exc:
        rec["outcome"] = "clean"
        rec["message"] = f"{type(exc).__name__}: {exc}"[:300]
    except BaseException as exc:  # noqa: BLE001 - this is what the probe counts
        rec["outcome"] = "traceback"
        rec["message"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rec["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
    sys.stdout.flush()
    sys.stderr.flush()
    return rec


def run_case(name: str, fn: Callable[..., Any], expect: str, ctx: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run one case in a forked child under ``timeout``; returns its record (outcome, checks)."""
    root: Path = ctx["root"]
    out_dir = root / "out" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = dict(ctx, out=out_dir)
    before = _tree(root / "in")
    outside_before = {k for k in _tree(root) if not k.startswith(("in/", "out/"))}
    err_path = root / "stderr.txt"
    rfd, wfd = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child runs the case and sends its record
        os.close(rfd)
        try:
            rec = _classify(fn, ctx, err_path)
            data = json.dumps(rec, default=str).encode()
        except BaseException:  # noqa: BLE001
            data = b'{"outcome": "traceback", "message": "probe child failed"}'
        with os.fdopen(wfd, "wb") as fh:
            fh.write(data)
        os._exit(0)
    os.close(wfd)
    rec: dict[str, Any] = {"case": name, "expect": expect}
    status = None
    while time.perf_counter() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = None
    with os.fdopen(rfd, "rb") as fh:
        data = fh.read()
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    if status is None:
        rec["outcome"] = "hang"
    elif not data:
        rec["outcome"] = "traceback"
        rec["message"] = f"the process died (status {status})"
    else:
        rec.update(json.loads(data))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    # progress lines ("pathoseg finetune: loading ...") may precede it: one line reports the error
    errors = [ln for ln in lines if any(w in ln.lower() for w in ("error", "traceback", "exception", "stopped", "interrupted"))]
    if "exit" in rec:
        code = rec["exit"]
        if code == 0:
            rec["outcome"] = "ok"
        elif code in (2, 130) and len(errors) == 1 and errors[0].startswith("pathoseg") and "Traceback" not in stderr:
            rec["outcome"] = "clean"
        else:
            rec["outcome"] = "traceback"
        rec["message"] = " | ".join(lines)[:400]
    if rec["outcome"] == "ok" and expect == "refuse":
        rec["outcome"] = "wrong"
    after = _tree(root / "in")
    rec["inputs_lost"] = sorted(k for k, v in before.items() if after.get(k) != v)
    rec["temp_left"] = sorted(p.name for p in out_dir.rglob("*") if p.name.endswith(".tmp-pathoseg"))
    outside_after = {k for k in _tree(root) if not k.startswith(("in/", "out/")) and k != "stderr.txt"}
    rec["stray_files"] = sorted(outside_after - outside_before - {"stderr.txt"})
    rec["stray_files"] += sorted(k for k in after if k not in before)
    return rec


def _inputs_in_child(root: Path) -> dict[str, Any]:
    """:func:`make_inputs` in a forked child, so that this process never starts torch's thread
    pools (a child forked after that may deadlock in OpenMP)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        code = 0
        try:
            ctx = make_inputs(root)
            data = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.items()}).encode()
        except BaseException:  # noqa: BLE001
            data = traceback.format_exc().encode()
            code = 1
        with os.fdopen(wfd, "wb") as fh:
            fh.write(data)
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"making the inputs failed:\n{data.decode(errors='replace')}")
    ctx = json.loads(data)
    return {k: (Path(v) if k in ("root", "in") else v) for k, v in ctx.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print the JSON summary; returns 0 when no traceback, hang or lost input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="run the cases whose name contains this")
    p.add_argument("--timeout", type=float, default=60.0, help="time limit per case (s)")
    p.add_argument("--details", action="store_true", help="print every case's record")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ.setdefault("PATHOSEG_HOME", tempfile.mkdtemp(prefix="pathoseg-home-"))
    with tempfile.TemporaryDirectory(prefix="hostile-", dir=args.work) as tmp:
        root = Path(tmp)
        ctx = _inputs_in_child(root)
        from napari_pathoseg.cli.main import build_parser

        build_parser()  # import every command module once, before the forks
        records = []
        try:
            if not args.only or "diskfull" in args.only:
                full_disk(ctx)
            for name, expect, fn in CASES:
                if args.only and args.only not in name:
                    continue
                if name.startswith("diskfull/") and ctx.get("full") is None:
                    continue
                rec = run_case(name, fn, expect, ctx, timeout=args.timeout)
                records.append(rec)
                print(f"{rec['outcome']:>9} {rec['seconds']:6.1f}s {name}: {rec.get('message', '')[:150]}", file=sys.stderr)
        finally:
            unmount_full(ctx)
    summary = {
        "cases": len(records),
        "clean_errors": sum(r["outcome"] == "clean" for r in records),
        "worked": sum(r["outcome"] == "ok" for r in records),
        "tracebacks": sum(r["outcome"] == "traceback" for r in records),
        "hangs": sum(r["outcome"] == "hang" for r in records),
        "wrongly_accepted": sum(r["outcome"] == "wrong" for r in records),
        "inputs_lost": sum(len(r["inputs_lost"]) for r in records),
        "temp_files_left": sum(len(r["temp_left"]) for r in records),
        "stray_files": sum(len(r["stray_files"]) for r in records),
        "seconds": round(sum(r["seconds"] for r in records), 1),
    }
    bad = [r for r in records if r["outcome"] in ("traceback", "hang", "wrong") or r["inputs_lost"] or r["temp_left"] or r["stray_files"]]
    summary["failures"] = [{k: r.get(k) for k in ("case", "outcome", "message", "where", "inputs_lost", "temp_left", "stray_files") if r.get(k)} for r in bad]
    if args.details:
        summary["records"] = records
    json.dump(summary, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
