"""Class-imbalance samplers, chosen by name: shuffle, oversample, undersample (the names
are declared in ``sampler_names.py``, which configs import without torch)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from .sampler_names import SAMPLERS

SamplerFactory = Callable[[np.ndarray, torch.Generator], Optional[Sampler]]


def _inverse_frequency(targets: np.ndarray) -> np.ndarray:
    counts = np.bincount(targets)
    return 1.0 / counts[targets]


@SAMPLERS.register("shuffle")
def shuffle(targets: np.ndarray, generator: torch.Generator) -> Optional[Sampler]:
    """No resampling: the DataLoader shuffles."""
    return None


@SAMPLERS.register("oversample")
def oversample(targets: np.ndarray, generator: torch.Generator) -> Sampler:
    """Inverse-frequency WeightedRandomSampler with replacement: every class is drawn
    equally often, an epoch keeps the training set's length."""
    w = torch.as_tensor(_inverse_frequency(targets), dtype=torch.double)
    return WeightedRandomSampler(w, num_samples=len(targets), replacement=True, generator=generator)


class _Undersampler(Sampler[int]):
    """Each epoch, a fresh random subset with the minority class's count of every class."""

    def __init__(self, targets: np.ndarray, generator: torch.Generator) -> None:
        self.by_class = [np.flatnonzero(targets == c) for c in np.unique(targets)]
        self.per_class = min(len(ix) for ix in self.by_class)
        self.generator = generator

    def __iter__(self):
        picks = [ix[torch.randperm(len(ix), generator=self.generator)[: self.per_class].numpy()]
                 for ix in self.by_class]
        order = np.concatenate(picks)[torch.randperm(self.per_class * len(picks), generator=self.generator).numpy()]
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.per_class * len(self.by_class)


@SAMPLERS.register("undersample")
def undersample(targets: np.ndarray, generator: torch.Generator) -> Sampler:
    return _Undersampler(targets, generator)

