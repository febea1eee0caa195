"""Batches as index tensors into the trial's images, held where the model runs.

The DataLoader path turns every image into a tensor and augments it on its own, in
Python, on the CPU: on a GPU that work, not the model, sets the pace. Here the
trial's (CXR-Normalised) uint8 images are placed once: in GPU memory when they fit
the trial's share of it, else in pinned host memory copied with non-blocking
transfers. A batch is then one gather of an index tensor, and its augmentation one
batched call on the device. The epoch's order comes from the same seeded samplers
as the DataLoader path; a batch's augmentation is seeded by (seed, epoch, batch).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from .augment_batch import normalize_batch_eval
from .cxrnorm_config import CXRNormConfig
from .cxrnorm_torch import normalize_batch

log = logging.getLogger(__name__)

# A batch transform: uint8 (B, 1, S, S) on the device and a seed -> float (B, 1, S', S').
BatchTransform = Callable[[torch.Tensor, int], torch.Tensor]

# The images may take this fraction of the trial's share of free GPU memory; the rest is
# for the model, its activations and the optimizer state.
IMAGES_SHARE_OF_FREE = 0.5


def batch_normalizer(mean: float, std: float) -> BatchTransform:
    """Evaluation's transform, bit-identical to the DataLoader path's ``eval_transform``."""
    return lambda x, seed: normalize_batch_eval(x, mean, std)


def place_images(images: np.ndarray, device: torch.device, share: float = 1.0) -> torch.Tensor:
    """The uint8 images (N, S, S) as one tensor for ``device``: in its memory when they
    fit ``IMAGES_SHARE_OF_FREE`` of its free memory times the trial's ``share`` of the
    GPU, else in pinned host memory (and the log says so)."""
    host = torch.from_numpy(np.array(images))  # a copy: the cache is a read-only memmap
    if device.type != "cuda":
        return host
    free, _ = torch.cuda.mem_get_info(device)
    budget = free * min(max(share, 0.0), 1.0) * IMAGES_SHARE_OF_FREE
    if host.nbytes <= budget:
        log.info("images on %s: %.0f MB of the %.0f MB this trial may use there", device, host.nbytes / 1e6,
                 budget / 1e6)
        return host.to(device)
    log.warning("images (%.0f MB) do not fit this trial's share of %s (%.0f MB): kept in pinned host memory "
                "and copied per batch", host.nbytes / 1e6, device, budget / 1e6)
    return host.pin_memory()


def normalize_placed(placed: torch.Tensor, cfg: CXRNormConfig, device: torch.device,
                     chunk: int = 512) -> torch.Tensor:
    """CXR-Norm ``placed`` (uint8 (N, S, S), on ``device`` or in pinned host memory) in
    place, chunk by chunk on ``device``: the peak is the images plus one chunk."""
    if cfg.is_identity:
        return placed
    start = time.perf_counter()
    for lo in range(0, len(placed), chunk):
        part = placed[lo:lo + chunk]
        part.copy_(normalize_batch(part.to(device, non_blocking=True), cfg))
    log.info("CXR-Norm of %d images on %s in %.1f s", len(placed), device, time.perf_counter() - start)
    return placed


class IndexBatches:
    """An epoch of ``(x, y)`` batches on ``device``: ``transform(images[rows[order]])``.

    ``sampler`` (an ``EpochSampler``, as the DataLoader path uses) gives the epoch's
    order, reseeded by ``set_epoch``; without one the order is ``rows``' own (evaluation).
    The images' storage device may differ from ``device`` (pinned host memory)."""

    def __init__(self, images: torch.Tensor, rows: np.ndarray, targets: np.ndarray, batch_size: int,
                 transform: BatchTransform, device: torch.device, *, sampler: Optional[Sampler] = None,
                 batch_seed: Callable[[int, int], int] = lambda epoch, batch: 0, drop_last: bool = False) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"internal: {len(rows)} rows but {len(targets)} targets")
        self.images, self.transform, self.device = images, transform, device
        self.rows = torch.as_tensor(np.array(rows, dtype=np.int64))  # a copy: rows may be read-only
        self.targets = torch.as_tensor(np.array(targets, dtype=np.int64))
        self.batch_size, self.sampler, self.batch_seed, self.drop_last = batch_size, sampler, batch_seed, drop_last

    def _order(self) -> tuple[int, torch.Tensor]:
        if self.sampler is None:
            return 0, torch.arange(len(self.rows))
        drawn = [(epoch, index) for epoch, _, index in self.sampler]
        epoch = drawn[0][0] if drawn else 0
        return epoch, torch.as_tensor([index for _, index in drawn], dtype=torch.int64)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, order = self._order()
        rows = self.rows[order].to(self.images.device)
        targets = self.targets[order].to(self.device, non_blocking=True)
        for b in range(len(self)):
            lo = b * self.batch_size
            x = self.images.index_select(0, rows[lo:lo + self.batch_size])
            if self.images.is_pinned():  # the gather lands in pageable memory: a non-blocking copy needs pinned
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True).unsqueeze(1)
            yield self.transform(x, self.batch_seed(epoch, b)), targets[lo:lo + self.batch_size]
