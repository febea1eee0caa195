"""Classification losses for imbalanced chest X-ray classes.

Losses are chosen by name (``LOSSES``) and built from a frozen ``LossConfig`` (both
in ``loss_config.py``, which configs import without torch) plus the training set's
class counts, which the class-weighting schemes and the balanced focal alpha need.
Every loss casts its logits to float32 first, so it is computed accurately when the
model runs under bf16 autocast, and keeps its per-class tensors as buffers, so
``.to(device)`` moves them with the module.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .loss_config import ALPHA_MODES, LOSSES, WEIGHT_SCHEMES, LossConfig, parse_alpha_list

log = logging.getLogger(__name__)

LossBuilder = Callable[["LossConfig", Sequence[int]], nn.Module]
WeightScheme = Callable[[torch.Tensor, float], torch.Tensor]


# ---------------------------------------------------------------- class weights


@WEIGHT_SCHEMES.register("inverse")
def _inverse_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    return 1.0 / counts


@WEIGHT_SCHEMES.register("effective_number")
def _effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    # Cui et al. 2019: the effective number of samples is (1 - beta^n) / (1 - beta).
    return (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))


def class_weights(counts: Sequence[int], scheme: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class weights (float32) from training-set ``counts``, normalised to sum to
    the number of classes (so the average weight is 1 and the loss scale is kept)."""
    fn = WEIGHT_SCHEMES.get(scheme, where="loss.class_weights")
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if n.ndim != 1 or len(n) == 0:
        raise DataError(f"class_counts={list(counts)}: expected one count per class")
    empty = [i for i, c in enumerate(n.tolist()) if c <= 0]
    if empty:
        raise DataError(f"class_counts={[int(c) for c in n.tolist()]}: class index(es) {empty} have no "
                        "training images, so class weights are undefined; drop the class or fix the split")
    w = fn(n, beta)
    return (w * (len(n) / w.sum())).to(torch.float32)


# ---------------------------------------------------------------- loss modules


class CrossEntropyLoss(nn.Module):
    """Cross-entropy in float32 with optional per-class weights and label smoothing."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight,
                               label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017), mean over the batch.

    ``loss_i = sum_c q_ic * alpha_c * (1 - p_ic)^gamma * (-log p_ic)`` with ``q`` the
    (label-smoothed) target distribution; with ``gamma=0`` and no alpha this equals
    ``F.cross_entropy(label_smoothing=...)``."""

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        num_classes = logp.shape[-1]
        q = F.one_hot(target, num_classes).to(logp.dtype)
        if self.label_smoothing > 0:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        per_class = -logp * q
        if self.gamma > 0:
            # -expm1(log p) is 1 - p without cancellation for confident predictions;
            # the floor keeps the gradient of x^gamma finite at p == 1 when gamma < 1.
            one_minus_p = (-torch.expm1(logp)).clamp_min(1e-12)
            per_class = per_class * one_minus_p.pow(self.gamma)
        if self.alpha is not None:
            per_class = per_class * self.alpha
        return per_class.sum(dim=-1).mean()


# ---------------------------------------------------------------- builders


@LOSSES.register("cross_entropy")
def _build_cross_entropy(cfg: LossConfig, class_counts: Sequence[int]) -> nn.Module:
    return CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


@LOSSES.register("weighted_cross_entropy")
def _build_weighted_cross_entropy(cfg: LossConfig, class_counts: Sequence[int]) -> nn.Module:
    weight = class_weights(class_counts, cfg.class_weights, cfg.beta)
    log.info("weighted cross-entropy (%s): class weights %s", cfg.class_weights,
             [round(w, 4) for w in weight.tolist()])
    return CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def focal_alpha(alpha: str | Sequence[float], class_counts: Sequence[int]) -> torch.Tensor | None:
    """Per-class focal alpha: None for ``"none"``, inverse-frequency weights
    (normalised to sum to the number of classes) for ``"balanced"``, else the list."""
    if alpha == "none":
        return None
    if alpha == "balanced":
        return class_weights(class_counts, "inverse")
    return torch.tensor(parse_alpha_list(alpha), dtype=torch.float32)


@LOSSES.register("focal")
def _build_focal(cfg: LossConfig, class_counts: Sequence[int]) -> nn.Module:
    alpha = focal_alpha(cfg.alpha, class_counts)
    return FocalLoss(gamma=cfg.gamma, alpha=alpha, label_smoothing=cfg.label_smoothing)


def build_loss(cfg: LossConfig, class_counts: Sequence[int]) -> nn.Module:
    """Validate ``cfg`` and build its loss module; ``class_counts`` are the training
    set's per-class image counts (used by class weighting and balanced alpha)."""
    cfg.validate(num_classes=len(class_counts))
    return LOSSES.get(cfg.name, where="loss.name")(cfg, class_counts)


__all__ = ["LossConfig", "LOSSES", "WEIGHT_SCHEMES", "ALPHA_MODES", "CrossEntropyLoss", "FocalLoss",
           "build_loss", "class_weights", "focal_alpha"]
