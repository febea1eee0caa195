"""Training augmentation on (1, S, S) uint8 tensors, and the evaluation transform.

A preset (none | light | medium | heavy) sets every op's strength; any op can be
overridden by its own field. Ops run on uint8 before the float conversion, where
they are cheapest. Augmentation is never applied at evaluation: ``eval_transform``
only converts and normalises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.transforms import v2

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


def _to_float(mean: float, std: float) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean], [std])]


def train_transform(cfg: AugmentConfig, size: int, mean: float, std: float) -> v2.Compose:
    """uint8 (1, S, S) -> augmented, normalised float (1, size, size)."""
    a = cfg.resolved()
    ops: list = []
    if a.crop_scale < 1.0:
        ops.append(v2.RandomResizedCrop(size, scale=(a.crop_scale, 1.0), antialias=True))
    if a.perspective > 0:
        ops.append(v2.RandomPerspective(distortion_scale=a.perspective, p=0.5))
    if a.rotation > 0:
        ops.append(v2.RandomRotation(a.rotation))
    if a.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(a.hflip))
    if a.vflip > 0:
        ops.append(v2.RandomVerticalFlip(a.vflip))
    if a.brightness > 0 or a.contrast > 0:
        ops.append(v2.ColorJitter(brightness=a.brightness, contrast=a.contrast))
    if a.blur > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(3)], p=a.blur))
    if a.sharpness > 0:
        ops.append(v2.RandomAdjustSharpness(2.0, p=a.sharpness))
    if a.autocontrast > 0:
        ops.append(v2.RandomAutocontrast(p=a.autocontrast))
    return v2.Compose([*ops, *_to_float(mean, std)])


def eval_transform(mean: float, std: float) -> v2.Compose:
    """Evaluation: conversion and normalisation only."""
    return v2.Compose(_to_float(mean, std))
