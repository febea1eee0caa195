"""Augmentation settings: ``AugmentConfig`` and its presets, without torch.

A preset (none | light | medium | heavy) sets every op's strength; any op can be
overridden by its own field. The transforms are built by ``augment.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; a field left as None takes the preset's value (0 = off)."""

    preset: str = "light"
    perspective: Optional[float] = None  # RandomPerspective distortion scale (reports: 0.1)
    rotation: Optional[float] = None  # degrees, +-
    hflip: Optional[float] = None  # probability
    vflip: Optional[float] = None  # probability
    crop_scale: Optional[float] = None  # RandomResizedCrop minimum area fraction (1 = off)
    blur: Optional[float] = None  # probability of a 3x3 Gaussian blur
    sharpness: Optional[float] = None  # probability of RandomAdjustSharpness(2)
    autocontrast: Optional[float] = None  # probability
    brightness: Optional[float] = None  # ColorJitter brightness (+- fraction)
    contrast: Optional[float] = None  # ColorJitter contrast (+- fraction)

    def resolved(self) -> "AugmentConfig":
        """A copy with every None replaced by the preset's value."""
        base = PRESETS.get(self.preset)
        if base is None:
            raise ConfigError(f"augment.preset={self.preset!r}: unknown preset; valid presets: "
                              f"{', '.join(PRESETS)}")
        return dataclasses.replace(self, **{k: base[k] for k, v in self.ops().items() if v is None})

    def ops(self) -> dict[str, Optional[float]]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preset"}

    def validate(self, where: str = "augment") -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"{where}.preset={self.preset!r}: unknown preset; valid presets: {', '.join(PRESETS)}")
        problems = []
        for name, v in self.resolved().ops().items():
            upper = 45.0 if name == "rotation" else 1.0
            if not 0.0 <= float(v) <= upper:  # type: ignore[arg-type]
                problems.append(f"{where}.{name}={v}: must be between 0 and {upper:g}")
        if problems:
            raise ConfigError("invalid augmentation:\n  " + "\n  ".join(problems))


_OFF = dict(perspective=0.0, rotation=0.0, hflip=0.0, vflip=0.0, crop_scale=1.0, blur=0.0,
            sharpness=0.0, autocontrast=0.0, brightness=0.0, contrast=0.0)
PRESETS: dict[str, dict[str, float]] = {
    "none": _OFF,
    # The CoronaHack report's only augmentation: random perspective 0.1.
    "light": {**_OFF, "perspective": 0.1},
    "medium": {**_OFF, "perspective": 0.1, "rotation": 10.0, "hflip": 0.5, "crop_scale": 0.85,
               "brightness": 0.1, "contrast": 0.1},
    "heavy": {**_OFF, "perspective": 0.15, "rotation": 15.0, "hflip": 0.5, "crop_scale": 0.7,
              "blur": 0.2, "sharpness": 0.3, "autocontrast": 0.3, "brightness": 0.2, "contrast": 0.2},
}


__all__ = ["AugmentConfig", "PRESETS"]
