"""What stepping the folds of a cross-validated trial epoch by epoch costs.

A cross-validated trial (cv.py) trains its K folds in lock step: every epoch, each fold
is resumed from its checkpoint, trains one epoch and is checkpointed again, so the trial
can report fold means to ASHA each epoch and only one fold's model is in memory. The
baseline does the same training work the simple way: each fold trained straight
through, one after the other (no per-epoch report of the mean possible). Same data,
same configuration, same device; the per-fold results are identical (tests/test_cv.py).

Prints both wall times and the ratio cv / baseline: the overhead of resuming.

    python bench/bench_cv.py [--folds 3] [--epochs 4] [--size 64] [--images 300] [--backbone convnet5]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from cxrtune.config import TrialConfig, from_dict
from cxrtune.cv import fit_cv, fold_data
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import fit

log = logging.getLogger("bench_cv")


def config(tmp: Path, args: argparse.Namespace) -> TrialConfig:
    return from_dict(TrialConfig, {
        "data": {"root": str(tmp / "synthetic"), "cache_dir": str(tmp / "cache"), "image_size": args.size,
                 "synthetic_n": args.images, "folds": args.folds},
        "model": {"backbone": args.backbone},
        "loop": {"epochs": args.epochs, "batch_size": 32}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--backbone", default="convnet5")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("cxrtune").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-cv-") as tmp:
        cfg = config(Path(tmp), args)
        data = prepare_data(cfg.data, progress=False)
        fit_cv(cfg, data, lambda *_: None, workdir=Path(tmp) / "warm")  # imports, memo, allocator
        start = time.perf_counter()
        fit_cv(cfg, data, lambda *_: None, workdir=Path(tmp) / "cv")
        cv_s = time.perf_counter() - start
        start = time.perf_counter()
        for k in range(args.folds):
            fit(cfg, fold_data(data, k), workdir=Path(tmp) / f"fold{k}")
        base_s = time.perf_counter() - start
    log.info("%d folds x %d epochs, %s at %d px, %d images", args.folds, args.epochs, args.backbone, args.size,
             args.images)
    log.info("cxrtune (folds in lock step, resumed each epoch): %.1f s", cv_s)
    log.info("baseline (each fold straight through):           %.1f s", base_s)
    log.info("ratio cxrtune / baseline: %.2f", cv_s / base_s)


if __name__ == "__main__":
    main()
