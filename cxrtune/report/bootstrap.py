"""Percentile bootstrap confidence intervals of test-set metrics.

A test split of a few hundred chest X-rays gives metrics whose sampling error is as
large as the differences between trials, so the report quotes every metric with an
interval. Images of one patient are correlated (same anatomy, same scanner, often the
same label), so resampling images would pretend to have more independent evidence than
there is: :func:`bootstrap_intervals` resamples patients (groups) when it is told them.

The search calls it with the full metric set of :mod:`cxrtune.metrics` on every
resample. Those functions are scikit-learn backed and spend most of their ~10 ms per
call in input validation, so 1,000 resamples would take tens of seconds;
:func:`fast_classification_metrics` / :func:`fast_scheme_metrics` compute the same
dictionary with plain numpy (confusion-matrix metrics from ``bincount``, ROC-AUC from
mid-ranks, average precision from one sort, the ECE through metrics.py's own function)
and are tested equal to metrics.py's.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..data.labels import LabelScheme
from ..metrics import _check_inputs, binary_labels, expected_calibration_error

log = logging.getLogger(__name__)

MetricsFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


# --------------------------------------------------------------------------- resampling

def _group_codes(groups: Sequence[Any]) -> np.ndarray:
    """Integer code per image; images with a missing key (None, NaN) are each their own
    group, as images without a patient id are in the splits."""
    codes: dict[Any, int] = {}
    out = np.empty(len(groups), dtype=np.int64)
    fresh = 0
    for i, key in enumerate(groups):
        if key is None or (isinstance(key, float) and math.isnan(key)):
            out[i] = -1 - fresh  # negative: never collides with a real key's code
            fresh += 1
        else:
            out[i] = codes.setdefault(key, len(codes))
    return out


class _GroupSampler:
    """Draws bootstrap index arrays: whole groups with replacement, or single images.

    Group members are stored contiguously (``order``) with each group's start and size,
    so that one resample is a few vectorised numpy calls, not a loop over groups.
    """

    def __init__(self, n_images: int, groups: Sequence[Any] | None):
        self.n_images = n_images
        if groups is None:
            self.order = None
            return
        _, codes = np.unique(_group_codes(groups), return_inverse=True)
        self.order = np.argsort(codes, kind="stable")
        self.sizes = np.bincount(codes)
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))

    @property
    def n_groups(self) -> int:
        return self.n_images if self.order is None else len(self.sizes)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        if self.order is None:
            return rng.integers(0, self.n_images, self.n_images)
        drawn = rng.integers(0, len(self.sizes), len(self.sizes))
        sizes = self.sizes[drawn]
        ends = np.cumsum(sizes)
        # Position of every resampled image in ``order``: its group's start plus its
        # rank inside the group; a group drawn twice contributes its images twice.
        within = np.arange(ends[-1]) - np.repeat(ends - sizes, sizes)
        return self.order[np.repeat(self.starts[drawn], sizes) + within]


# --------------------------------------------------------------------------- intervals

def _validate(y_true: Any, probs: Any, groups: Any, n: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("y_true is empty: no images to resample")
    if p.ndim < 1 or p.shape[0] != len(y):
        raise ValueError(f"probs has {p.shape[0] if p.ndim else 0} rows (shape {p.shape}) but y_true "
                         f"has {len(y)} entries")
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries but y_true has {len(y)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (number of resamples) must be an integer >= 1, got {n!r}")
    if not (isinstance(level, (int, float, np.floating)) and 0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return y, p


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_intervals(y_true: Any, probs: Any, groups: Sequence[Any] | None, metrics_fn: MetricsFn,
                        n: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval ``(lo, hi)`` at ``level`` of every metric
    ``metrics_fn(y_true, probs)`` returns.

    ``groups`` (aligned with ``y_true``; patient ids, say) makes the resampling unit the
    group: each resample draws as many groups as there are, with replacement, and takes
    all images of every drawn group (twice if drawn twice). Without it images are
    resampled. Resamples where a metric is NaN (a class absent from the resample) are
    left out for that metric; a metric NaN in every resample gets ``(nan, nan)``.
    Deterministic for a given ``seed``.
    """
    y, p = _validate(y_true, probs, groups, n, level)
    sampler = _GroupSampler(len(y), groups)
    rng = np.random.default_rng(seed)
    values: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for r in range(n):
        idx = sampler.draw(rng)
        for key, value in metrics_fn(y[idx], p[idx]).items():
            if key not in values:
                # A key first seen late counts as NaN (left out) in the earlier resamples.
                values[key] = np.full(n, np.nan)
            values[key][r] = value
    intervals = {key: _percentile_interval(v, level) for key, v in values.items()}
    _log_summary(values, n, sampler, time.perf_counter() - started)
    return intervals


def _log_summary(values: Mapping[str, np.ndarray], n: int, sampler: _GroupSampler, seconds: float) -> None:
    unit = "images" if sampler.order is None else "groups"
    log.debug("bootstrap: %d resamples of %d %s, %d metrics, %.1f s", n, sampler.n_groups, unit,
              len(values), seconds)
    undefined = {k: int(np.isnan(v).sum()) for k, v in values.items() if np.isnan(v).any()}
    if undefined:
        log.info("bootstrap: resamples left out where a metric is undefined (of %d): %s", n, undefined)


# --------------------------------------------------------------------------- fast metrics

def _midranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores``, ties sharing their average rank."""
    order = np.argsort(scores, kind="mergesort")
    ranked = scores[order]
    first = np.concatenate(([True], ranked[1:] != ranked[:-1]))
    starts = np.flatnonzero(first)
    ends = np.concatenate((starts[1:], [len(scores)]))
    ranks = np.empty(len(scores))
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]
    return ranks


def _roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count 1/2): equals the trapezoidal
    area scikit-learn computes. Caller ensures positives and negatives exist."""
    n_pos = positive.sum()
    n_neg = len(positive) - n_pos
    rank_sum = _midranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's average precision: sum over distinct thresholds (high to low) of
    the recall increase times the precision at that threshold."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked = scores[order]
    # Last position of every run of tied scores: one threshold per distinct score.
    last = np.flatnonzero(np.concatenate((ranked[1:] != ranked[:-1], [True])))
    tps = np.cumsum(positive[order])[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _ranking_score(y: np.ndarray, p: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """metrics._auc with a numpy ``score``: the positive class for two classes, else the
    one-vs-rest macro over the classes present; NaN with fewer than two present."""
    present = np.flatnonzero(np.bincount(y, minlength=p.shape[1]))
    if len(present) < 2:
        return math.nan
    if p.shape[1] == 2:
        return score(y == 1, p[:, 1])
    return float(np.mean([score(y == k, p[:, k]) for k in present]))


def _prf(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 with scikit-learn's zero_division=0."""
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = support + predicted  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def fast_classification_metrics(y_true: Any, probs: Any, classes: Sequence[str],
                                prefix: str = "") -> dict[str, float]:
    """The dictionary of :func:`cxrtune.metrics.classification_metrics` (same keys, order,
    conventions and input checks), computed with numpy alone for the bootstrap."""
    classes = list(classes)
    c = len(classes)
    if c < 2:
        raise ValueError(f"need at least 2 classes, got {classes}")
    y, p = _check_inputs(y_true, probs, c)
    pred = p.argmax(axis=1)
    cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
    n = float(len(y))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    negatives = n - support
    tn = negatives - (predicted - tp)
    specificity = np.divide(tn, negatives, out=np.zeros(c), where=negatives > 0)
    precision, recall, f1 = _prf(tp, support, predicted)
    present = support > 0
    out: dict[str, float] = {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(tp[present] / support[present])),
    }
    weights = support / n
    for avg, agg in (("macro", np.mean), ("weighted", lambda v: np.sum(v * weights))):
        out[f"precision_{avg}"] = float(agg(precision))
        out[f"recall_{avg}"] = float(agg(recall))
        out[f"f1_{avg}"] = float(agg(f1))
    out["roc_auc_macro"] = _ranking_score(y, p, _roc_auc)
    out["pr_auc_macro"] = _ranking_score(y, p, _average_precision)
    out["ece"] = expected_calibration_error(y, p)
    out.update({f"sensitivity/{cls}": float(recall[k]) for k, cls in enumerate(classes)})
    out.update({f"specificity/{cls}": float(specificity[k]) for k, cls in enumerate(classes)})
    out.update({f"f1/{cls}": float(f1[k]) for k, cls in enumerate(classes)})
    if c == 2:
        out["sensitivity"] = float(recall[1])
        out["specificity"] = float(specificity[1])
    return {f"{prefix}{k}": v for k, v in out.items()}


def fast_scheme_metrics(y_true: Any, probs: Any, scheme: LabelScheme, prefix: str = "val/") -> dict[str, float]:
    """:func:`cxrtune.metrics.scheme_metrics` (binary groups included) with numpy alone.

    For the bootstrap: ``functools.partial(fast_scheme_metrics, scheme=scheme, prefix="test/")``.
    """
    out = fast_classification_metrics(y_true, probs, scheme.classes, prefix)
    if scheme.binary_groups:
        yb = binary_labels(y_true, scheme)
        pb = scheme.to_binary_probs(probs)
        out.update(fast_classification_metrics(yb, pb, list(scheme.binary_groups), f"{prefix}binary/"))
    return out
