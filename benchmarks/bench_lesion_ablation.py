"""M3's claim as an ablation: multi-scale + focal vs single-scale + focal vs single-scale + cross-entropy.

Every variant trains with the project's own command (``pathoseg lesion-train``) for the same
budget (the same epochs x steps, i.e. the same number of low-resolution blocks drawn; the
multi-scale step also runs each block's high-resolution tiles, so it costs more time: wall
time is reported) and the same seeds, in run folders under ``--runs``; existing runs are
resumed (a finished run is not repeated). Each best checkpoint (by validation) is then scored
on the held-out **test** part of the shipped split: pooled pixel ROC AUC and Dice at 0.5.

    python benchmarks/bench_lesion_ablation.py --runs /work/runs/lesion-ablation \
        --epochs 8 --steps 20 --seeds 0 1 --out benchmarks/results/lesion_ablation.json

Writes one JSON document: per variant and seed the test scores, the wall time of training,
and the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "multiscale+focal": "lesion-lite",
    "single+focal": "lesion-lite-single",
    "single+bce": "lesion-lite-bce",
}


def train(preset: str, out: Path, *, epochs: int, steps: int, seed: int, threads: int) -> None:
    cmd = [sys.executable, "-m", "napari_pathoseg.cli.main", "lesion-train", "--preset", preset, "--out", str(out),
           "--epochs", str(epochs), "--steps-per-epoch", str(steps), "--seed", str(seed), "--threads", str(threads),
           "--resume"]
    with open(out.with_suffix(".log"), "a") as log:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=log)


def main(argv: list[str] | None = None) -> int:
    from napari_pathoseg.cli.lesion_train import SHIPPED_SPLIT
    from napari_pathoseg.cli.train import DEFAULT_DATA
    from napari_pathoseg.methods.lesion.data import load_split
    from napari_pathoseg.methods.lesion.release import evaluate_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="folder for the run folders (outside the repository)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    split = load_split(SHIPPED_SPLIT)
    table: dict[str, dict] = {}
    for variant, preset in VARIANTS.items():
        per_seed = {}
        for seed in args.seeds:
            out = runs / f"{preset}-s{seed}"
            train(preset, out, epochs=args.epochs, steps=args.steps, seed=seed, threads=args.threads)
            hist = json.loads((out / "history.json").read_text())
            scores = evaluate_checkpoint(out / "best.safetensors", data_dir=args.data, split=split, parts=("test",))
            t = scores["test"]
            per_seed[str(seed)] = {
                "test_auc": t["auc"], "test_dice": t["dice"],
                "per_dataset": {d: {"auc": v["auc"], "dice": v["dice"]} for d, v in t["per_dataset"].items()},
                "best_epoch": int(max(range(len(hist)), key=lambda i: hist[i]["val"]["score"])) ,
                "train_seconds": round(sum(h["seconds"] for h in hist), 1),
            }
        table[variant] = {
            "preset": preset,
            "seeds": per_seed,
            "mean_test_auc": sum(s["test_auc"] for s in per_seed.values()) / len(per_seed),
            "mean_test_dice": sum(s["test_dice"] for s in per_seed.values()) / len(per_seed),
        }
    doc = {"budget": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_blocks": 8, "threads": args.threads},
           "split": SHIPPED_SPLIT.name, "variants": table}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
