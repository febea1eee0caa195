"""A torch Dataset over cached (and CXR-Norm-normalised) uint8 images.

Items are read straight from the memory-mapped array, so a DataLoader worker
never decodes a file; augmentation runs on small uint8 tensors.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset


class CachedImages(Dataset):
    """``images[rows[i]]`` as a (1, S, S) uint8 tensor through ``transform``, with ``targets[i]``."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, targets: np.ndarray,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"internal: {len(rows)} rows but {len(targets)} targets")
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # np.array copies out of the read-only memmap; torch needs a writable buffer.
        x = torch.from_numpy(np.array(self.images[self.rows[i]]))[None]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])


def channel_stats(images: np.ndarray | torch.Tensor, rows: np.ndarray,
                  max_images: int = 2048) -> tuple[float, float]:
    """Mean and std (in 0..1 units) of the training images, for input normalisation.

    A deterministic subsample bounds the cost on large datasets; the statistics of a
    couple of thousand radiographs are stable to the third decimal. ``images`` may be a
    tensor on any device (the device input pipeline's)."""
    rows = np.sort(np.asarray(rows))
    if len(rows) > max_images:
        rows = rows[np.linspace(0, len(rows) - 1, max_images).astype(np.int64)]
    picked = (images.index_select(0, torch.as_tensor(rows, device=images.device)).cpu().numpy()
              if isinstance(images, torch.Tensor) else images[rows])
    x = np.asarray(picked, dtype=np.float64) / 255.0
    return float(x.mean()), float(max(x.std(), 1e-6))
