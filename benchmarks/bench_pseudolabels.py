"""M2's claim: a student on strong + filtered pseudo-labels beats the student on strong labels
only, and beats the teacher.

Measured on the held-out test images of the shipped split
(``src/napari_pathoseg/models/weights/nuclei-lite.split.json``: MoNuSeg + CPM-15):

(a) the teacher (``--teacher``, default the shipped ``nuclei-lite``);
(b) the student (``--student`` preset; fresh, or with ``--init teacher`` fine-tuned from the
    teacher's weights) trained on the split's strong labels only;
(c) the same student, same seed and step budget, on strong labels + the teacher's
    pseudo-labels of unlabelled tiles kept at the middle confidence threshold;
(d) (c) at each of the ``--thresholds`` (tile score = mean per-pixel confidence max(p, 1-p)).

Every one of the 30 MoNuSeg training images (and all of CPM-15) is in the split's strong set,
so the unlabelled tiles come from elsewhere: the tissue tiles of the bundled
CMU-1-Small-Region.svs (0.499 µm/px, never labelled) plus the two MoNuSAC sample images
(``monusac_samples/images``, 0.194 µm/px, their masks unused). The pseudo-labelled tiles are
used without human review (all tiles scoring >= threshold), as M2 does.

Run from the repository root::

    python benchmarks/bench_pseudolabels.py --quick        # smoke: a few steps, 3 test images
    python benchmarks/bench_pseudolabels.py                # full mode

Prints one JSON document on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLIT = REPO / "src" / "napari_pathoseg" / "models" / "weights" / "nuclei-lite.split.json"
DATA = REPO.parent / "shared" / "data"
MONUSAC_MPP = 0.19448

logger = logging.getLogger("bench_pseudolabels")


def _metrics(res: dict) -> dict:
    m = res["metrics"]
    return {k: round(float(m[k]), 4) for k in ("aji", "f1", "dice", "pq")}


def _evaluate(model, items) -> dict:
    from napari_pathoseg.methods.nuclei.evaluate import evaluate_items

    t0 = time.perf_counter()
    res = evaluate_items(model, items, per_image=True)
    out = _metrics(res)
    out["per_image_aji"] = {k: round(float(v["aji"]), 4) for k, v in res["per_image"].items()}
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _generate(teacher, out: Path, *, max_tiles: int | None, data: Path) -> dict:
    """Pseudo-label the unlabelled sources into two review projects (threshold 0: keep all)."""
    from napari_pathoseg.review.project import run_pseudolabels
    from napari_pathoseg.wsi.slide import sample_slide_path

    t0 = time.perf_counter()
    common = dict(predict=teacher.predict, to_instances=teacher.to_instances, model_name=teacher.name,
                  tile_size=256, mpp=teacher.mpp, threshold=0.0, overwrite=True)
    projects = [run_pseudolabels(sample_slide_path(), out / "review_cmu1", max_tiles=max_tiles, **common)]
    monusac = data / "monusac_samples" / "images"
    if monusac.is_dir():
        projects.append(run_pseudolabels(monusac, out / "review_monusac", source_mpp=MONUSAC_MPP,
                                         max_tiles=max_tiles, **common))
    scores = [r.score for p in projects for r in p.tiles()]
    return {"projects": projects, "scores": scores, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 4 steps, 3 test images, 8 tiles/source")
    p.add_argument("--teacher", default="nuclei-lite", help="teacher model name or .safetensors checkpoint")
    p.add_argument("--student", default="transcycle-lite", help="student preset")
    p.add_argument("--init", choices=("fresh", "teacher"), default="fresh",
                   help="student weights: fresh, or the teacher's (fine-tuning; the student preset must be the teacher's)")
    p.add_argument("--data", default=str(DATA), help="shared data folder")
    p.add_argument("--split", default=str(SPLIT))
    p.add_argument("--epochs", type=int, default=None, help="student epochs (full default 4)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="(full default 60)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantiles", default="0,0.5,0.75",
                   help="thresholds as quantiles of the tile scores (0 keeps every tile); (c) uses the middle one")
    p.add_argument("--max-tiles", type=int, default=None, help="tiles per unlabelled source (default all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work", default=None, help="folder for projects and checkpoints (default: a temp folder, removed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    import torch

    from napari_pathoseg.methods.nuclei.finetune import FinetuneConfig, FinetuneDone, build_finetune_data, iter_finetune, load_pseudo_items
    from napari_pathoseg.methods.nuclei.finetune import FinetuneData
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.methods.nuclei.datasets import M2Data, load_nuclei_originals, load_split
    from napari_pathoseg.methods.nuclei.train import EpochEvent

    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 4)
    steps = args.steps_per_epoch or (4 if args.quick else 60)
    max_tiles = args.max_tiles if args.max_tiles is not None else (8 if args.quick else None)
    data_root = Path(args.data)
    split = load_split(args.split)
    test_names = split["test"][:3] if args.quick else split["test"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_pseudo_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        teacher = load_model(args.teacher, device="cpu")
        test_items = load_nuclei_originals(data_root, names=test_names)
        logger.info("teacher %s; %d test images", teacher.path, len(test_items))
        result: dict = {
            "mode": "quick" if args.quick else "full",
            "command": "python benchmarks/bench_pseudolabels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "teacher": {"model": str(args.teacher), "path": str(teacher.path), "preset": teacher.config.preset,
                        "best_epoch": teacher.meta.get("epoch"),
                        "steps_per_epoch": teacher.meta.get("steps_per_epoch"),
                        "val_aji": teacher.meta.get("val_metrics", {}).get("best_aji")},
            "student": {"preset": args.student, "epochs": epochs, "steps_per_epoch": steps,
                        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "init": args.init},
            "test_images": test_names,
            "torch_threads": args.threads,
        }
        result["a_teacher"] = _evaluate(teacher, test_items)
        logger.info("teacher: %s", result["a_teacher"])

        gen = _generate(teacher, work, max_tiles=max_tiles, data=data_root)
        scores = np.asarray(gen["scores"])
        qs = [float(q) for q in args.quantiles.split(",")]
        thresholds = sorted({round(float(np.quantile(scores, q)), 4) if q > 0 else 0.0 for q in qs})
        result["pseudo_generation"] = {
            "sources": [str(pr.source_path) for pr in gen["projects"]],
            "tiles": int(scores.size), "tile_size": 256, "mpp": teacher.mpp,
            "score_min": round(float(scores.min()), 4), "score_median": round(float(np.median(scores)), 4),
            "score_max": round(float(scores.max()), 4), "seconds": round(gen["seconds"], 1),
        }

        if args.init == "teacher" and teacher.config.preset != args.student:
            raise SystemExit(f"--init teacher needs --student {teacher.config.preset} (the teacher's preset)")
        base_cfg = dict(base=str(teacher.path) if args.init == "teacher" else None, preset=args.student, strong=(str(data_root),), split=args.split,
                        epochs=epochs, steps_per_epoch=steps, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, device="cpu", threads=args.threads, register=False)
        strong = build_finetune_data(FinetuneConfig(out_dir=str(work / "tmp"), **base_cfg), mpp=0.5)

        def train(tag: str, data: FinetuneData) -> dict:
            cfg = FinetuneConfig(out_dir=str(work / tag), name=tag, **base_cfg)
            t0 = time.perf_counter()
            done = None
            curve = []
            for ev in iter_finetune(cfg, data=data):
                if isinstance(ev, EpochEvent):
                    curve.append(round(ev.val_metrics["best_aji"], 4))
                    logger.info("%s epoch %d val best_aji %.4f (%.0f s)", tag, ev.epoch, ev.val_metrics["best_aji"], ev.seconds)
                elif isinstance(ev, FinetuneDone):
                    done = ev
            seconds = time.perf_counter() - t0
            model = load_model(done.best_checkpoint, device="cpu")
            out = _evaluate(model, test_items)
            out.update(val_best_aji_per_epoch=curve, best_epoch=done.best_metrics.get("epoch"),
                       train_seconds=round(seconds, 1), n_strong_images=data.n_strong, n_pseudo_tiles=data.n_pseudo,
                       instance_method=done.best_metrics.get("instance_method"))
            logger.info("%s: %s", tag, out)
            return out

        result["b_student_strong"] = train("student_strong", strong)
        per_thr = {}
        for thr in thresholds:
            px, py = [], []
            for pr in gen["projects"]:
                x, y = load_pseudo_items(pr, mpp=0.5, include_pending=True, min_score=thr)
                px += x
                py += y
            m2 = strong.m2
            data = FinetuneData(
                m2=M2Data(x_train=m2.x_train + px, y_train=m2.y_train + py, val=m2.val, split=m2.split),
                n_strong=strong.n_strong, n_pseudo=len(px), description=f"{strong.description} + {len(px)} pseudo",
            )
            out = train(f"student_pseudo_{thr:.4f}", data)
            out["threshold"] = thr
            per_thr[f"{thr:.4f}"] = out
        mid = thresholds[len(thresholds) // 2]
        result["c_student_strong_pseudo"] = dict(per_thr[f"{mid:.4f}"])
        result["d_thresholds"] = {k: {kk: v[kk] for kk in ("threshold", "n_pseudo_tiles", "aji", "f1", "dice", "pq")}
                                  for k, v in per_thr.items()}
        a, b, c = (result[k]["aji"] for k in ("a_teacher", "b_student_strong", "c_student_strong_pseudo"))
        result["claim"] = {
            "student_pseudo_beats_student_strong_aji": bool(c > b),
            "student_pseudo_beats_teacher_aji": bool(c > a),
            "best_threshold_by_test_aji": max(per_thr.values(), key=lambda v: v["aji"])["threshold"],
        }
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
