"""A scripted reviewer for the M5 review path: copies of an exported tissue review project.

No pathologist reviews anything in a benchmark, so this stands in for one, to measure what a
review adds (docs/tissue.md, "The review path, measured"). From a project written by
``pathoseg tissue-review-export RUN --out PROJECT`` it makes two copies beside it:

* ``PROJECT-correct<N>``: the N least confident pseudo masks replaced by their true masks
  (``ReviewProject.save_mask`` -> status "corrected"), the others accepted;
* ``PROJECT-reject<N>``: the N least confident rejected, the others accepted.

Each copy is then trained with ``pathoseg tissue-train --reviewed COPY ...`` (the command is in
docs/tissue.md). Prints JSON: the copies and the patches corrected or rejected.

    python benchmarks/bench_tissue_review.py PROJECT --data ../shared/data --n 10 --tiles 96
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", help="a tissue review project from pathoseg tissue-review-export")
    ap.add_argument("--data", required=True, help="the shared data folder (WSSS4LUAD masks give the truth)")
    ap.add_argument("--n", type=int, default=10, help="least confident masks corrected / rejected (default 10)")
    ap.add_argument("--tiles", type=int, default=96, help="the tile size the run was trained with (default 96)")
    ap.add_argument("--force", action="store_true", help="replace existing copies")
    args = ap.parse_args()

    from napari_pathoseg.methods.tissue.data import load_wsss4luad
    from napari_pathoseg.review.store import ReviewProject

    src = Path(args.project)
    truth = {t.name: t.mask for t in load_wsss4luad(args.data, train_masks=True, tile=args.tiles).train}
    out = {"project": str(src), "n": args.n, "copies": {}}
    for mode in ("correct", "reject"):
        dst = src.with_name(f"{src.name}-{mode}{args.n}")
        if dst.exists():
            if not args.force:
                raise SystemExit(f"{dst} exists; give --force to replace it")
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        project = ReviewProject.open(dst)
        touched = []
        for i, rec in enumerate(project.tiles(sort_by="score", descending=False)):  # least confident first
            if i < args.n and mode == "correct":
                project.save_mask(rec.tile_id, truth[rec.source_name])
                touched.append(rec.source_name)
            elif i < args.n:
                project.set_state(rec.tile_id, "rejected")
                touched.append(rec.source_name)
            else:
                project.set_state(rec.tile_id, "accepted")
        out["copies"][mode] = {"path": str(dst), "patches": touched}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
