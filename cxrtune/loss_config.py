"""Which loss a trial trains with: ``LossConfig`` and the loss names, without torch.

The losses themselves (and the class-weighting schemes) are registered by
``losses.py`` under the names declared here, and imported when a loss is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .losses import LossBuilder, WeightScheme

LOSSES: Registry[LossBuilder] = Registry(
    "loss", names=("cross_entropy", "weighted_cross_entropy", "focal"), provider="cxrtune.losses")
WEIGHT_SCHEMES: Registry[WeightScheme] = Registry(
    "class-weight scheme", names=("inverse", "effective_number"), provider="cxrtune.losses")

ALPHA_MODES = ("none", "balanced")


@dataclass(frozen=True)
class LossConfig:
    """Which loss to train with and its hyperparameters."""

    name: str = "cross_entropy"  # cross_entropy | weighted_cross_entropy | focal
    class_weights: str = "inverse"  # for weighted_cross_entropy: inverse | effective_number
    beta: float = 0.999  # effective-number beta (Cui et al. 2019)
    gamma: float = 2.0  # focal focusing parameter; 0 = cross-entropy
    # focal: none | balanced | per-class numbers, as a YAML list [0.25, 0.75] or "0.25,0.75"
    alpha: str | tuple[float, ...] = "none"
    label_smoothing: float = 0.0

    def validate(self, where: str = "loss", num_classes: int | None = None) -> None:
        """Raise one ConfigError listing every invalid value.

        ``num_classes`` (when known) is checked against an explicit alpha list."""
        problems: list[str] = []
        if self.name not in LOSSES:
            problems.append(f"{where}.name={self.name!r}: unknown loss; valid losses: "
                            f"{', '.join(LOSSES.names())}")
        if self.class_weights not in WEIGHT_SCHEMES:
            problems.append(f"{where}.class_weights={self.class_weights!r}: valid schemes: "
                            f"{', '.join(WEIGHT_SCHEMES.names())}")
        if not 0.0 <= self.beta < 1.0:
            problems.append(f"{where}.beta={self.beta}: must be in [0, 1) (e.g. 0.999)")
        if not self.gamma >= 0.0:  # also rejects NaN
            problems.append(f"{where}.gamma={self.gamma}: must be >= 0 (e.g. 2.0; 0 = cross-entropy)")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"{where}.label_smoothing={self.label_smoothing}: must be in [0, 1) (e.g. 0.1)")
        problems.extend(_alpha_problems(self.alpha, where, num_classes))
        if problems:
            raise ConfigError("invalid loss config:\n  " + "\n  ".join(problems))


def parse_alpha_list(alpha: str | Sequence[float]) -> list[float]:
    """Per-class values of ``"0.25,0.75"`` or ``[0.25, 0.75]``; ValueError on a non-number."""
    parts = alpha.split(",") if isinstance(alpha, str) else alpha
    return [float(part) for part in parts]


def _alpha_problems(alpha: str | Sequence[float], where: str, num_classes: int | None) -> list[str]:
    if isinstance(alpha, str) and alpha in ALPHA_MODES:
        return []
    key = f"{where}.alpha={alpha if isinstance(alpha, str) else list(alpha)!r}"
    try:
        values = parse_alpha_list(alpha)
    except ValueError:
        return [f"{key}: must be 'none', 'balanced' or comma-separated per-class numbers "
                "(e.g. '0.25,0.75' or a list [0.25, 0.75])"]
    problems = []
    if any(not (v >= 0.0 and math.isfinite(v)) for v in values):
        problems.append(f"{key}: every per-class alpha must be a finite number >= 0")
    if num_classes is not None and len(values) != num_classes:
        problems.append(f"{key}: has {len(values)} values but the task has {num_classes} classes; "
                        "give one alpha per class")
    return problems


__all__ = ["LossConfig", "LOSSES", "WEIGHT_SCHEMES", "ALPHA_MODES", "parse_alpha_list"]
