"""M5 ablation on WSSS4LUAD tiles: ONS vs plain CE on the same pseudo masks, with vs without PDA.

Every variant is a ``pathoseg tissue-train`` command (the project's own), run one after the
other (one training at a time), each in its own run folder under ``--runs``; a variant whose
``result.json`` is there is not run again (re-running the script resumes the table)::

    python benchmarks/bench_tissue_ablation.py --runs /work/runs/tissue-ablation \\
        --pseudo-from /work/runs/tissue-luad-lite-v2 --out /work/runs/tissue-ablation/ablation.json

* **ONS vs CE** (stage 2 only): ``--pseudo-from`` the shipped run's pseudo masks, presets
  ``tissue-lite`` (ONS) and ``tissue-lite-ce`` (CE), seeds 0 and 1, ``--epochs2`` x ``--steps2``.
* **Corrected patches** (the review measurement, simulated): ONS, first seed, with the
  ``--correct`` N least confident pseudo masks replaced by their true masks (0 = ``s2-ons``).
* **PDA vs no PDA** (stage 1 only, PDA acts nowhere else): ``--stage1-only``, presets
  ``tissue-lite`` and ``tissue-lite-nopda``, seeds 0 and 1, ``--epochs1`` x ``--steps1``; the
  score is the held-out test mIoU of the tiled Grad-CAM++ pseudo masks.

All variants use ``--tiles`` and ``--balance`` as the shipped model. The JSON holds each
variant's command, seconds and held-out test scores, and the mean per arm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("miou", "miou_tumour_stroma", "iou_tumour epithelium", "iou_stroma", "iou_normal", "pixel_accuracy")


def variants(args: argparse.Namespace) -> list[dict]:
    """Seed by seed (a partial table is usable): stage-2 ONS / CE, the corrected-patch runs, stage-1 PDA / none."""
    common = ["--tiles", str(args.tiles), "--balance", "--threads", str(args.threads), "--data", args.data]
    out = []
    for seed in args.seeds:
        s2 = ["--pseudo-from", args.pseudo_from, "--seed", str(seed), "--epochs2", str(args.epochs2),
              "--steps2", str(args.steps2), *common]
        for preset, arm in (("tissue-lite", "ons"), ("tissue-lite-ce", "ce")):
            out.append({"name": f"s2-{arm}-s{seed}", "arm": f"stage2 {arm}", "score": "window",
                        "args": ["--preset", preset, *s2]})
        if seed == args.seeds[0]:
            for n in args.correct:
                out.append({"name": f"s2-ons-s{seed}-fix{n}", "arm": f"stage2 ons, {n} corrected", "score": "window",
                            "args": ["--preset", "tissue-lite", "--correct", str(n), *s2]})
        for preset, arm in (("tissue-lite", "pda"), ("tissue-lite-nopda", "nopda")):
            out.append({"name": f"s1-{arm}-s{seed}", "arm": f"stage1 {arm}", "score": "pseudo_masks",
                        "args": ["--preset", preset, "--stage1-only", "--seed", str(seed),
                                 "--epochs1", str(args.epochs1), "--steps1", str(args.steps1), *common]})
    return out


def run(v: dict, runs: Path) -> dict:
    folder = runs / v["name"]
    result = folder / "result.json"
    if not result.is_file():
        resume = ["--resume"] if (folder / "stage1").exists() or (folder / "stage2").exists() else []
        cmd = [sys.executable, "-m", "napari_pathoseg.cli.main", "tissue-train", *v["args"], "--out", str(folder),
               *resume]
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with open(folder / "train.log", "a") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{v['name']}: exit {proc.returncode}; see {folder / 'train.log'}")
        res = json.loads(proc.stdout)
        res["bench_seconds"] = round(time.perf_counter() - t, 1)
        result.write_text(json.dumps(res, indent=1))
    res = json.loads(result.read_text())
    scores = (res.get("test") or {}).get(v["score"], {})
    return {"name": v["name"], "arm": v["arm"], "command": "pathoseg tissue-train " + " ".join(v["args"]),
            "seconds": res.get("bench_seconds", res.get("wall_seconds")),
            "test": {k: scores.get(k) for k in KEYS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="folder for the variants' run folders (outside the repository)")
    p.add_argument("--pseudo-from", required=True, help="run whose pseudo masks the ONS / CE variants share")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", required=True, help="JSON table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tiles", type=int, default=96)
    p.add_argument("--epochs1", type=int, default=10)
    p.add_argument("--steps1", type=int, default=40)
    p.add_argument("--epochs2", type=int, default=12)
    p.add_argument("--steps2", type=int, default=15)
    p.add_argument("--correct", type=int, nargs="*", default=[5, 10],
                   help="also stage 2 (ONS, first seed) with this many least confident pseudo masks corrected")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="run only the variants whose name starts with this")
    args = p.parse_args()
    runs = Path(args.runs)
    rows = []
    for v in variants(args):
        if args.only and not v["name"].startswith(args.only):
            continue
        rows.append(run(v, runs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    arms: dict[str, dict] = {}
    for r in rows:
        a = arms.setdefault(r["arm"], {"runs": 0, **{k: 0.0 for k in KEYS}})
        a["runs"] += 1
        for k in KEYS:
            a[k] += (r["test"].get(k) or 0.0)
    for a in arms.values():
        for k in KEYS:
            a[k] = round(a[k] / a["runs"], 4)
    out = {"runs": rows, "mean_per_arm": arms,
           "budget": {"epochs1": args.epochs1, "steps1": args.steps1, "epochs2": args.epochs2, "steps2": args.steps2,
                      "tiles": args.tiles, "seeds": args.seeds}}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["mean_per_arm"], indent=1))


if __name__ == "__main__":
    main()
