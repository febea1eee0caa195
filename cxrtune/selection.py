"""Which way a metric is better, and the "best so far" of a run: defined here once.

Every metric's direction follows from its name: losses, calibration error and costs
(``loss``, ``ece``, ``latency``, ``cost/...``, ``time/...``) are lower-is-better,
everything else (accuracy, F1, AUC, sensitivity, ...) is higher-is-better. A config
may still state a mode, but one that contradicts the name is an error rather than a
silent "best" that is the worst.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import ConfigError

MODES = ("max", "min")
# A metric whose last path component contains one of these words is lower-is-better.
_LOWER_WORDS = ("loss", "ece", "latency", "error", "brier")
# Whole families that are lower-is-better whatever the leaf is called.
_LOWER_PREFIXES = ("cost/", "time/")


def direction(metric: str) -> str:
    """``"min"`` for lower-is-better metrics, ``"max"`` for the rest (by name alone)."""
    if any(metric.startswith(p) or f"/{p}" in metric for p in _LOWER_PREFIXES):
        return "min"
    leaf = metric.rsplit("/", 1)[-1].lower()
    words = leaf.replace("-", "_").split("_")
    return "min" if any(w in words for w in _LOWER_WORDS) else "max"


def resolve_mode(metric: str, mode: Optional[str], where: str) -> str:
    """The direction of ``metric``; an explicit ``mode`` must agree with it.

    ``where`` names the setting in the error (e.g. ``"search.mode"``)."""
    wanted = direction(metric)
    if mode is None:
        return wanted
    if mode not in MODES:
        raise ConfigError(f"{where}={mode!r}: must be 'max' or 'min' (or left out: {metric} is "
                          f"{wanted}imised)")
    if mode != wanted:
        raise ConfigError(f"{where}={mode}: {metric} is {'lower' if wanted == 'min' else 'higher'}-is-better, "
                          f"so its best value is the {'lowest' if wanted == 'min' else 'highest'}; remove "
                          f"{where} (it follows from the metric) or set it to {wanted}")
    return wanted


def is_better(value: Optional[float], best: Optional[float], mode: str) -> bool:
    """Whether ``value`` strictly improves on ``best`` (NaN never does; ties keep the earlier)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def best_index(values: Iterable[Optional[float]], mode: str) -> Optional[int]:
    """Index of the best value (the earliest on ties); None when there is none."""
    best_i, best = None, None
    for i, v in enumerate(values):
        if is_better(v, best, mode):
            best_i, best = i, v
    return best_i


def rank_key(value: Optional[float], mode: str) -> tuple[bool, float]:
    """A sort key that puts better values first and missing (None/NaN) values last."""
    if value is None or math.isnan(value):
        return (True, 0.0)
    return (False, -value if mode == "max" else value)


@dataclass
class BestSoFar:
    """The best value of one metric seen so far, and the step (epoch) it came from."""

    metric: str
    mode: str
    value: Optional[float] = None
    step: int = -1

    def update(self, value: Optional[float], step: int) -> bool:
        """Take ``value`` of ``step``; True when it is a new best."""
        if is_better(value, self.value, self.mode):
            self.value, self.step = float(value), step  # type: ignore[arg-type]
            return True
        return False


__all__ = ["MODES", "direction", "resolve_mode", "is_better", "best_index", "rank_key", "BestSoFar"]
