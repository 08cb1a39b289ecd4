"""M1's claims as an ablation, with the project's own command (``pathoseg malignancy-train``).

Per seed, two runs on the built-in table of the shared data (same split, same few masks), with
the same budget for every stage (epochs x steps x batch):

* ``mixed``: ``--stages A,B,C`` -> A (image labels only), B (masks, encoder from A), C
  (image labels, encoder from B);
* ``scratch``: ``--stages B --b-init scratch`` -> B from random initialisation (masks only).

Every best checkpoint (by validation) is scored on the held-out **test** part: ROC AUC and
accuracy of A and C on whole images, Dice of B and B-scratch on the held-out malignant images
with masks. The claims checked: B (from A) beats B-scratch (Dice); C beats A (AUC); B and C
(mixed labels) beat the models trained on one label kind only (B-scratch: masks only; A:
image labels only). Existing runs are resumed (a finished run is not repeated).

    python benchmarks/bench_malignancy_ablation.py --runs /work/runs/malignancy-ablation \
        --epochs 4 --steps 20 --seeds 0 1 --out benchmarks/results/malignancy_ablation.json

Writes one JSON document: per seed and model the test scores and the training wall time,
the means over seeds, and for each claim the differences per seed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def train(args: argparse.Namespace, out: Path, seed: int, extra: list[str]) -> float:
    """Run ``pathoseg malignancy-train`` (resuming) into ``out``; returns the wall seconds."""
    cmd = [sys.executable, "-m", "napari_pathoseg.cli.main", "malignancy-train", "--out", str(out),
           "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps), "--seed", str(seed),
           "--threads", str(args.threads), "--resume",
           "--b-negatives", "0",  # M1 as described: B sees the masks only (the CLI's default is 0.5)
           *extra]
    cmd += ["--labels", args.labels] + (["--masks", args.masks] if args.masks else []) if args.labels else \
        ["--data-root", args.data_root]
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "a") as log:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=log)
    return time.perf_counter() - t0


def score(best: Path, samples: list, *, module: str) -> dict[str, Any]:
    """Test scores of one stage checkpoint (``classifier`` or ``segmenter``)."""
    from napari_pathoseg.methods.malignancy.evaluate import evaluate_nets
    from napari_pathoseg.methods.malignancy.model import WHOLE_IMAGE_FACTOR, validate_m1_config
    from napari_pathoseg.methods.malignancy.network import MalignancyClassifier, MalignancySegmenter
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict

    tensors, config, meta = load_checkpoint(best, expected_kind="m1")
    cfg = validate_m1_config(config, where=str(best))
    net = (MalignancyClassifier if module == "classifier" else MalignancySegmenter)(cfg)
    load_state_strict(net, tensors[module], what=module, path=best)
    kw = {module: net}
    res = evaluate_nets(samples, side=WHOLE_IMAGE_FACTOR * cfg.tile_size, threshold=cfg.threshold,
                        mask_threshold=cfg.mask_threshold, **kw)
    res["best_epoch"] = meta.get("epoch")
    return res


def main(argv: list[str] | None = None) -> int:
    from napari_pathoseg.cli.train import DEFAULT_DATA
    from napari_pathoseg.methods.malignancy.data import load_samples, shared_table, user_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="folder for the run folders (outside the repository)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of every stage")
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch of every stage")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=DEFAULT_DATA)
    ap.add_argument("--labels", default=None, help="the user's labels instead of the built-in table (scored on val)")
    ap.add_argument("--masks", default=None)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    table = user_table(args.labels, masks=args.masks) if args.labels else shared_table(args.data_root)
    part = "test" if table.part("test") else "val"
    samples = load_samples(table.part(part), mpp=1.0)
    per_seed: dict[str, Any] = {}
    for seed in args.seeds:
        mixed, scratch = runs / f"seed{seed}" / "mixed", runs / f"seed{seed}" / "scratch"
        t_mixed = train(args, mixed, seed, ["--stages", "A,B,C"])
        t_scratch = train(args, scratch, seed, ["--stages", "B", "--b-init", "scratch"])
        r = {
            "A (image labels only)": score(mixed / "A" / "best.safetensors", samples, module="classifier"),
            "B (masks, encoder from A)": score(mixed / "B" / "best.safetensors", samples, module="segmenter"),
            "C (image labels, encoder from B)": score(mixed / "C" / "best.safetensors", samples, module="classifier"),
            "B-scratch (masks only)": score(scratch / "B" / "best.safetensors", samples, module="segmenter"),
            "wall_seconds": {"mixed A+B+C": round(t_mixed, 1), "scratch B": round(t_scratch, 1)},
        }
        per_seed[str(seed)] = r
        print(json.dumps({"seed": seed, **r}), file=sys.stderr, flush=True)

    def values(model: str, key: str) -> list[float]:
        return [per_seed[s][model].get(key, float("nan")) for s in per_seed]

    def claim(better: str, worse: str, key: str) -> dict[str, Any]:
        b, w = values(better, key), values(worse, key)
        diffs = [round(x - y, 4) for x, y in zip(b, w)]
        return {"metric": key, better: b, worse: w, "difference_per_seed": diffs,
                "mean_difference": round(sum(diffs) / len(diffs), 4), "holds_in_every_seed": all(d > 0 for d in diffs)}

    models = [m for m in per_seed[str(args.seeds[0])] if m != "wall_seconds"]
    mean = {m: {k: round(sum(values(m, k)) / len(per_seed), 4) for k in ("auc", "accuracy", "dice", "dice_mean")
                if all(isinstance(v, float) and math.isfinite(v) for v in values(m, k))} for m in models}
    doc = {
        "command": "python benchmarks/bench_malignancy_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": {"epochs_per_stage": args.epochs, "steps_per_epoch": args.steps, "threads": args.threads},
        "data": table.describe(),
        "scored_on": f"{part} part ({len(samples)} images, {sum(s.mask is not None for s in samples)} with masks)",
        "per_seed": per_seed,
        "mean": mean,
        "claims": {
            "B from A beats B from scratch (Dice)": claim("B (masks, encoder from A)", "B-scratch (masks only)", "dice"),
            "C beats A (AUC)": claim("C (image labels, encoder from B)", "A (image labels only)", "auc"),
            "C beats the image-labels-only model A (accuracy)": claim("C (image labels, encoder from B)",
                                                                       "A (image labels only)", "accuracy"),
            "B beats the masks-only model B-scratch (per-image Dice)": claim("B (masks, encoder from A)",
                                                                             "B-scratch (masks only)", "dice_mean"),
        },
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
