"""One epoch of model-ready tensors: cxrtune's cache vs decoding every epoch.

cxrtune's way: decode each file once into the image cache, run CXR-Norm once over
the cache (memoised), then each epoch only augments small uint8 arrays.
Baseline: what a plain torchvision ImageFolder pipeline with an on-the-fly
CXR-Norm does every epoch: decode the full-size file, CXR-Norm it, resize.
Same images, same CXR-Norm parameters, same augmentation, same DataLoader.

Real radiographs are 1-4 megapixel files; the synthetic images are drawn at
that size here so the comparison is about the real work.

    python bench/bench_cache.py [--n 200] [--size 224] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cxrtune.data.cache import build_cache
from cxrtune.data.cxrnorm import CXRNormConfig, apply, clear_memo_cache, normalized
from cxrtune.data.dataset import CachedImages
from cxrtune.data.decode import load_gray, to_square
from cxrtune.data.sources import load_records
from cxrtune.data.synthetic import write_synthetic

log = logging.getLogger("bench_cache")


def augmentation(mean: float, std: float) -> v2.Compose:
    """The source report's training transform: random perspective, flip, normalise."""
    return v2.Compose([
        v2.RandomPerspective(distortion_scale=0.1, p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([mean], [std]),
    ])


class DecodeEveryEpoch(Dataset):
    """The baseline: full-size decode + CXR-Norm + resize for every item, every epoch."""

    def __init__(self, paths, targets, cfg: CXRNormConfig, size: int, transform) -> None:
        self.paths, self.targets, self.cfg, self.size, self.transform = paths, targets, cfg, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = to_square(apply(load_gray(self.paths[i]), self.cfg), self.size)
        return self.transform(torch.from_numpy(img)[None]), int(self.targets[i])


def epoch_seconds(ds: Dataset, batch: int, workers: int) -> float:
    t = time.perf_counter()
    for x, _ in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers):
        assert x.dtype == torch.float32
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--min-px", type=int, default=1024)
    p.add_argument("--max-px", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    cfg = CXRNormConfig()  # the reports' CLAHE 2.0 / 8x8, median 5, 2..98 stretch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_synthetic(root, n=args.n, layout="imagefolder", seed=0, size_range=(args.min_px, args.max_px))
        records = load_records("imagefolder", root)
        paths = [r.path for r in records]
        targets = np.array([sorted({r.label for r in records}).index(r.label) for r in records])
        transform = augmentation(0.5, 0.25)

        t = time.perf_counter()
        cache = build_cache(paths, args.size, Path(tmp) / "cache", workers=1, progress=False)
        build_s = time.perf_counter() - t
        clear_memo_cache()
        t = time.perf_counter()
        images = normalized(cache.images, cache.fingerprint, cfg, Path(tmp) / "memo")
        norm_s = time.perf_counter() - t
        cached = CachedImages(images, np.arange(len(paths)), targets, transform)
        cached_s = min(epoch_seconds(cached, args.batch, args.workers) for _ in range(2))
        naive = DecodeEveryEpoch(paths, targets, cfg, args.size, transform)
        naive_s = epoch_seconds(naive, args.batch, args.workers)

    n = len(paths)
    result = {
        "bench": "cache_epoch", "n_images": n, "source_px": [args.min_px, args.max_px], "size": args.size,
        "cached_img_per_s": round(n / cached_s, 1), "naive_img_per_s": round(n / naive_s, 1),
        "ratio": round(naive_s / cached_s, 1),
        "one_time_cache_build_s": round(build_s, 2), "one_time_cxrnorm_s": round(norm_s, 2),
        "break_even_epochs": round((build_s + norm_s) / max(naive_s - cached_s, 1e-9), 2),
        "torch_threads": torch.get_num_threads(), "cv2_threads": cv2.getNumThreads(),
    }
    log.info("epoch of %d model-ready tensors (%d px from %d-%d px files):", n, args.size, args.min_px, args.max_px)
    log.info("  cxrtune cache + memoised CXR-Norm: %8.1f img/s", result["cached_img_per_s"])
    log.info("  decode + CXR-Norm + resize/epoch:  %8.1f img/s", result["naive_img_per_s"])
    log.info("  ratio: %.1fx  (one-time: cache build %.1f s, CXR-Norm %.2f s; pays off after %.2f epochs)",
             result["ratio"], build_s, norm_s, result["break_even_epochs"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
