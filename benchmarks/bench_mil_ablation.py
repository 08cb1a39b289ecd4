"""M4's claim as an ablation: negative guidance + Sinkhorn vs self-distillation alone vs mean-pooling MIL.

Every variant trains with the project's own command (``pathoseg mil-train COHORT --variant V``)
on the same mosaic cohort (``scripts/make_mil_cohort.py``), with the same encoder (lite preset),
batch (64 tiles a pool and step; the bag baseline draws 4 + 4 slides x 16 tiles), budget
(epochs x steps) and seeds, in run folders under ``--runs``; existing runs are resumed (a
finished run is not repeated). Each best checkpoint (by the validation slides) is scored on the
held-out **test** mosaics (built from source tiles kept out of training): slide ROC AUC, slide
accuracy at the model's threshold (0.5) and at the best threshold for those slides, tile ROC AUC
of the heat map against the hidden tile truth (all tiles; within positive slides), per data set.

    python benchmarks/bench_mil_ablation.py --cohort /work/runs/mil-cohort --runs /work/runs/mil-ablation \\
        --epochs 3 --steps 60 --seeds 0 1 2 --out benchmarks/results/mil_ablation.json

Writes one JSON document: per variant and seed the scores and the wall time of training, and
the mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("negguide", "selfdistill", "meanpool")


def train(variant: str, cohort: Path, out: Path, *, epochs: int, steps: int, seed: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "napari_pathoseg.cli.main", "mil-train", str(cohort / "train.csv"),
           "--val", str(cohort / "val.csv"), "--variant", variant, "--out", str(out), "--epochs", str(epochs),
           "--steps-per-epoch", str(steps), "--seed", str(seed), "--threads", str(threads), "--resume"]
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "a") as log:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=log)
    return time.perf_counter() - t0


def _mean(values: list) -> dict:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "min": float(min(v)) if v else None,
            "max": float(max(v)) if v else None}


def main(argv: list[str] | None = None) -> int:
    from napari_pathoseg.methods.mil.evaluate import (
        compare_poolings,
        evaluate_checkpoint,
        pick_threshold,
        scores_by_group,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, help="folder made by scripts/make_mil_cohort.py")
    ap.add_argument("--runs", required=True, help="folder for the run folders (outside the repository)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    cohort, runs = Path(args.cohort), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    for seed in args.seeds:  # seed-major: an interrupted bench has every variant at the same seeds
        for variant in args.variants:
            out = runs / f"{variant}-s{seed}"
            seconds = train(variant, cohort, out, epochs=args.epochs, steps=args.steps, seed=seed, threads=args.threads)
            hist = json.loads((out / "history.json").read_text())
            res = evaluate_checkpoint(out / "best.safetensors", cohort / "test.csv", threads=args.threads)
            slides = res.pop("slides")
            labels = np.array([d["label"] for d in slides])
            probs = np.array([d["probability"] for d in slides])
            thr = pick_threshold(probs, labels)
            table.setdefault(variant, {"seeds": {}})["seeds"][str(seed)] = {
                "slide_auc": res["slide_auc"], "slide_accuracy": res["slide_accuracy"],
                "slide_accuracy_best_threshold": float(((probs >= thr) == (labels == 1)).mean()),
                "tile_auc": res["tile_auc"], "tile_auc_in_positive": res["tile_auc_in_positive"],
                "by_source": scores_by_group(slides),
                "poolings": compare_poolings(slides),
                "best_epoch": int(max(range(len(hist)), key=lambda i: hist[i]["val"]["val_score"])),
                "train_seconds": round(sum(h["seconds"] for h in hist), 1), "wall_seconds": round(seconds, 1),
            }
            print(f"{variant} seed {seed}: slide AUC {res['slide_auc']}, tile AUC {res['tile_auc']}", file=sys.stderr,
                  flush=True)
            if args.out:  # the runs so far, in case the bench is stopped
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).with_suffix(".partial.json").write_text(json.dumps(table, indent=1) + "\n")
    for variant, t in table.items():
        s = list(t["seeds"].values())
        for key in ("slide_auc", "slide_accuracy", "slide_accuracy_best_threshold", "tile_auc", "tile_auc_in_positive"):
            t[key] = _mean([x[key] for x in s])
    doc = {"command": "python benchmarks/bench_mil_ablation.py " + " ".join(sys.argv[1:]),
           "budget": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch": 64, "threads": args.threads,
                      "preset": "lite"},
           "cohort": str(cohort), "test_slides": "test.csv (mosaics from held-out source tiles)", "variants": table}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
