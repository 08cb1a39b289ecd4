"""Mosaic-slide benchmark: seconds and peak memory to make mosaics of given sizes.

Each run makes one mosaic through the ``pathoseg mosaic`` command (the parser of
``cli/mosaic.py`` and the CLI driver), in a fresh process, into a temporary folder that is
deleted afterwards. It prints one JSON object with, per data set and size: seconds, peak RSS
(``VmHWM``, MB), slide file size, cells and the slide label.

Usage: ``python benchmarks/bench_mosaic.py --data ../shared/data [--sets kather2016_texture_tiles,ebhi_seg_crc] [--sizes 8192,32768]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
from napari_pathoseg.cli import mosaic as cm
from napari_pathoseg.cli._driver import ArgumentParser, call_command
p = ArgumentParser(prog="pathoseg")
cm.add_commands(p.add_subparsers(dest="command", required=True))
args = p.parse_args(sys.argv[1:])
t = time.perf_counter()
rc = call_command(args.func, args)
dt = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
sys.stderr.write(json.dumps({"rc": rc, "seconds": round(dt, 1), "peak_rss_mb": round(int(hwm) / 1024)}) + "\n")
"""


def run_one(data: Path, size: int, *, mpp: float, seed: int, tumour_fraction: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-mosaic-") as tmp:
        out = Path(tmp) / "m.tif"
        argv = ["mosaic", "--data", str(data), "--out", str(out), "--size", str(size), "--mpp", str(mpp),
                "--seed", str(seed), "--tumour-fraction", str(tumour_fraction)]  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, check=False)
        stats = json.loads(proc.stderr.strip().splitlines()[-1])
        if stats["rc"] != 0:
            raise SystemExit(f"mosaic failed: {proc.stderr.strip()}")
        res = json.loads(proc.stdout)
        stats.update(
            slide_mb=round(out.stat().st_size / 2**20, 1),
            n_cells=res["n_cells"],
            cell_px=res["cell_px"],
            slide_label=res["slide_label"],
        )
        return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the shared data folder")
    ap.add_argument("--sets", default="kather2016_texture_tiles,ebhi_seg_crc")
    ap.add_argument("--sizes", default="8192,32768")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tumour-fraction", type=float, default=0.2)
    a = ap.parse_args()
    out: dict = {}
    for name in a.sets.split(","):
        for size in (int(s) for s in a.sizes.split(",")):
            out[f"{name}@{size}"] = run_one(Path(a.data) / name, size, mpp=a.mpp, seed=a.seed, tumour_fraction=a.tumour_fraction)
            print(f"{name} {size}: {out[f'{name}@{size}']}", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
