"""Training augmentation on (1, S, S) uint8 tensors, and the evaluation transform.

A preset (none | light | medium | heavy) sets every op's strength; any op can be
overridden by its own field. Ops run on uint8 before the float conversion, where
they are cheapest. Augmentation is never applied at evaluation: ``eval_transform``
only converts and normalises. ``AugmentConfig`` and the presets live in
``augment_config.py``, which configs import without torch.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from .augment_config import PRESETS, AugmentConfig


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


__all__ = ["AugmentConfig", "PRESETS", "train_transform", "eval_transform"]
