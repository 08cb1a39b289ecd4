"""Build the M4 cohort: mosaic slides from real tiles, with a tile-level held-out split.

    python scripts/make_mil_cohort.py --data ../shared/data --out /work/runs/mil-cohort

1. **Held-out split of the source tiles.** For each data set (Kather 2016, NCT-CRC-HE samples,
   EBHI-Seg) the tiles of every class are shuffled (seeded) and ``--test-share`` of them (at
   least one per class with two or more tiles) go to the *test* copy, the rest to the *train*
   copy. Each copy is a folder of symbolic links under ``OUT/sources/{train,test}/<data set>``
   with its own ``index.csv`` (the rows of its tiles), so ``wsi.mosaic`` reads it like the
   original, and train and test mosaics share no source tile. ``OUT/split.json`` lists them.
2. **Mosaic slides** (``wsi.mosaic.make_mosaic``) at 1.0 µm/px, ``--size`` px square, 64-µm cells
   (the lite tile: one tile per cell), tissue outline on 60 % of the slide: positive slides hold
   one compact tumour region (``tumour_fraction`` drawn uniformly from ``--tumour-share``, a
   smooth field with ``cluster`` 2 cells: Kather ``01_tumor``, NCT ``TUM``, EBHI-Seg
   ``adenocarcinoma``), negative slides none. ``train`` and ``val`` slides come from the train
   copy, ``test`` slides from the test copy. Per data set and split, slides are made for each
   class in the counts of ``--mix``.
3. **Cohort CSVs** ``OUT/{train,val,test}.csv`` (``slide,label,mpp``; slide paths relative to
   the CSV). The per-cell truth (``NAME.cells.csv``, column ``tumour``) stays beside each slide;
   training never reads it, only the scoring does.

Slides that exist are kept (the command resumes); ``--force`` rebuilds them. Never write
into the data folder or the repository: mosaics fall under their sources' licences.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DATASETS = {  # folder -> (short name, class column, file columns)
    "kather2016_texture_tiles": ("kather", "class", ("file",)),
    "crc_tissue_patches_samples": ("nct", "class", ("file",)),
    "ebhi_seg_crc": ("ebhi", "class", ("image", "mask")),
}


def split_sources(data: Path, out: Path, *, test_share: float, seed: int) -> dict:
    """Write the train/test link copies of every data set; returns the split record."""
    record = {}
    rng = np.random.default_rng(seed)
    for folder, (short, cls_col, file_cols) in DATASETS.items():
        src = data / folder
        with open(src / "index.csv", newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames, list(reader)
        by_class: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_class.setdefault(r[cls_col], []).append(i)
        test_idx = set()
        for c in sorted(by_class):
            idx = list(by_class[c])
            rng.shuffle(idx)
            n = len(idx)
            n_test = 0 if n < 2 else min(n - 1, max(1, int(round(test_share * n))))
            test_idx.update(idx[:n_test])
        parts = {"train": [r for i, r in enumerate(rows) if i not in test_idx],
                 "test": [r for i, r in enumerate(rows) if i in test_idx]}
        record[short] = {}
        for part, prow in parts.items():
            dst = out / "sources" / part / folder
            dst.mkdir(parents=True, exist_ok=True)
            for r in prow:
                for col in file_cols:
                    link = dst / r[col]
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.is_symlink():
                        os.symlink((src / r[col]).resolve(), link)
            if (src / "README.md").is_file() and not (dst / "README.md").exists():
                os.symlink((src / "README.md").resolve(), dst / "README.md")
            with open(dst / "index.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=fields)
                w.writeheader()
                w.writerows(prow)
            record[short][part] = sorted(r[file_cols[0]] for r in prow)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shared data folder (holding the three data sets)")
    ap.add_argument("--out", required=True, help="cohort folder (outside the repository)")
    ap.add_argument("--size", type=int, default=1280, help="slide side in px at 1.0 µm/px")
    ap.add_argument("--test-share", type=float, default=0.3)
    ap.add_argument("--tumour-share", type=float, nargs=2, default=(0.1, 0.3), metavar=("LOW", "HIGH"))
    ap.add_argument("--mix", default="kather=14,ebhi=6,nct=4",
                    help="train slides per class and data set; val and test take 1/4 and 1/2 of it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    from napari_pathoseg.wsi.mosaic import make_mosaic

    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if out == data or data in out.parents:
        sys.exit(f"error: write the cohort outside the data folder {data}")
    out.mkdir(parents=True, exist_ok=True)
    split = split_sources(data, out, test_share=args.test_share, seed=args.seed)
    (out / "split.json").write_text(json.dumps(split, indent=1))
    mix = {k: int(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    folder_of = {short: folder for folder, (short, _, _) in DATASETS.items()}
    counts = {"train": mix, "val": {k: max(1, v // 4) for k, v in mix.items()},
              "test": {k: max(1, v // 2) for k, v in mix.items()}}
    rng = np.random.default_rng(args.seed + 1)
    t0 = time.time()
    seed = 1000 * args.seed
    for part, per in counts.items():
        src_part = "test" if part == "test" else "train"
        rows = []
        for short, n in per.items():
            src = out / "sources" / src_part / folder_of[short]
            for label in ("positive", "negative"):
                for i in range(n):
                    seed += 1
                    share = float(rng.uniform(*args.tumour_share)) if label == "positive" else 0.0
                    name = f"{short}_{label[:3]}_{i:02d}"
                    slide = out / "slides" / part / f"{name}.tif"
                    if args.force or not slide.is_file():
                        slide.parent.mkdir(parents=True, exist_ok=True)
                        res = make_mosaic(src, slide, size=args.size, mpp=1.0, seed=seed, tumour_fraction=share,
                                          cell_um=64.0, overwrite=args.force)
                        got = "positive" if res.slide_label == "tumour" else "negative"
                        if got != label:
                            sys.exit(f"error: {slide} came out {res.slide_label}; change --tumour-share or --size")
                        print(f"{part} {name}: {res.slide_label}, tumour share {share:.2f}, {time.time() - t0:.0f} s",
                              flush=True)
                    rows.append((slide.relative_to(out).as_posix(), label, "1.0"))
        with open(out / f"{part}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["slide", "label", "mpp"])
            w.writerows(rows)
    print(json.dumps({"out": str(out), "slides": {p: 2 * sum(c.values()) for p, c in counts.items()},
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
