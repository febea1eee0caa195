"""Classification metrics, all in one place (scikit-learn backed).

Every function takes integer labels ``y_true`` (shape ``(n,)``, values in
``range(num_classes)``) and class probabilities ``probs`` (shape
``(n, num_classes)``, rows summing to ~1); predictions are ``probs.argmax(1)``.
Results are flat ``dict[str, float]`` of plain Python floats, keyed
``f"{prefix}{name}"`` with the names listed by :func:`metric_names`.

Robustness conventions:

* precision/recall/F1 use ``labels=range(num_classes)`` and ``zero_division=0``,
  so a class that is absent from ``y_true`` (and never predicted) scores 0 and
  still counts in the macro averages; its ``sensitivity/<class>`` is 0 too.
  ``specificity/<class>`` is 0 when the class has no negatives.
* ``balanced_accuracy`` is the mean recall over the classes *present* in
  ``y_true`` (scikit-learn's definition).
* ``roc_auc_macro`` / ``pr_auc_macro`` are one-vs-rest macro averages over the
  classes present in ``y_true`` (a class's AUC is undefined without positives).
  For two classes both are of the positive class (index 1) alone, as is usual for a
  screening test: ``roc_auc_macro`` is its ROC-AUC, ``pr_auc_macro`` its average
  precision (the negative class's PR curve would measure something else).
  With fewer than two classes present both are ``NaN`` -- they never raise.
* ``ece`` is the top-label expected calibration error (15 equal-width bins).

scikit-learn is imported by the functions that compute metrics, not by the module:
configs check metric names (:func:`check_metric_name`) without loading it.

Malformed inputs (wrong shapes, labels out of range, non-finite
probabilities, rows not summing to 1, no samples) raise ``ValueError``: they
are programming errors, not user input.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .data.labels import LabelScheme
from .errors import ConfigError

# Class-independent metric names, in the order classification_metrics emits them.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "roc_auc_macro",
    "pr_auc_macro",
    "ece",
)
# Per-class metric families: key is f"{family}/{class_name}".
PER_CLASS_METRICS: tuple[str, ...] = ("sensitivity", "specificity", "f1")
# Extra plain keys for two-class problems (of the positive class, index 1).
BINARY_METRICS: tuple[str, ...] = ("sensitivity", "specificity")

_ROW_SUM_TOL = 1e-3


def metric_names(classes: Sequence[str]) -> list[str]:
    """Keys (without prefix) that :func:`classification_metrics` returns for ``classes``."""
    names = list(METRIC_NAMES)
    for family in PER_CLASS_METRICS:
        names += [f"{family}/{c}" for c in classes]
    if len(classes) == 2:
        names += list(BINARY_METRICS)
    return names


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] != num_classes:
        raise ValueError(f"probs must have shape ({y.shape[0]}, {num_classes}), got {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"y_true values must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf (did training diverge?)")
    sums = p.sum(axis=1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > _ROW_SUM_TOL:
        raise ValueError(f"probs rows must sum to 1 (max deviation {worst:.3g}); pass softmax outputs, not logits")
    return y.astype(np.int64), p


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int counts, rows = true class, cols = predicted."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(np.asarray(y_true), np.asarray(y_pred),
                            labels=list(range(num_classes))).astype(np.int64)


def reliability_table(y_true: np.ndarray, probs: np.ndarray,
                      n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per top-label confidence bin: image count, accuracy and mean confidence (NaN for
    an empty bin). ``n_bins`` equal-width bins ``(lo, hi]`` on [0, 1]; a confidence of
    exactly 0 falls in the first bin. The ECE and the reliability diagram both read it."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = np.asarray(probs, dtype=np.float64)
    y, p = _check_inputs(y_true, p, p.shape[1] if p.ndim == 2 else -1)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    which = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / counts
        confidence = np.bincount(which, weights=conf, minlength=n_bins) / counts
    return counts, accuracy, confidence


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE over :func:`reliability_table`'s bins:
    ``sum_b (n_b / n) * |accuracy_b - mean_confidence_b|``."""
    counts, accuracy, confidence = reliability_table(y_true, probs, n_bins)
    seen = counts > 0
    return float(np.sum(counts[seen] / counts.sum() * np.abs(accuracy[seen] - confidence[seen])))


def _ovr_macro(y: np.ndarray, p: np.ndarray, score) -> float:
    """One-vs-rest macro of ``score`` over classes present in ``y``; NaN if < 2 present."""
    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    return float(np.mean([score((y == k).astype(np.int64), p[:, k]) for k in present]))


def _auc(y: np.ndarray, p: np.ndarray, score) -> float:
    """``score`` of the positive class for two classes (NaN unless both occur), else
    the one-vs-rest macro average."""
    if p.shape[1] == 2:
        return float(score(y, p[:, 1])) if len(np.unique(y)) == 2 else math.nan
    return _ovr_macro(y, p, score)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                           prefix: str = "") -> dict[str, float]:
    """All metrics of :func:`metric_names` for ``classes``, keyed ``prefix + name``."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    classes = list(classes)
    c = len(classes)
    if c < 2:
        raise ValueError(f"need at least 2 classes, got {classes}")
    y, p = _check_inputs(y_true, probs, c)
    pred = p.argmax(axis=1)
    labels = list(range(c))
    cm = confusion(y, pred, c)
    n = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    fp = predicted - tp
    tn = n - support - fp
    negatives = tn + fp
    specificity = np.divide(tn, negatives, out=np.zeros(c), where=negatives > 0)
    present = support > 0

    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    out: dict[str, float] = {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(tp[present] / support[present])),
    }
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"] = float(pa)
        out[f"recall_{avg}"] = float(ra)
        out[f"f1_{avg}"] = float(fa)
    out["roc_auc_macro"] = _auc(y, p, roc_auc_score)
    out["pr_auc_macro"] = _auc(y, p, average_precision_score)
    out["ece"] = expected_calibration_error(y, p)
    for k, cls in enumerate(classes):
        out[f"sensitivity/{cls}"] = float(rec[k])
    for k, cls in enumerate(classes):
        out[f"specificity/{cls}"] = float(specificity[k])
    for k, cls in enumerate(classes):
        out[f"f1/{cls}"] = float(f1[k])
    if c == 2:
        out["sensitivity"] = float(rec[1])
        out["specificity"] = float(specificity[1])
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def binary_labels(y_true: np.ndarray, scheme: LabelScheme) -> np.ndarray:
    """Map task-class indices to binary-group indices (order of ``scheme.binary_groups``)."""
    groups = list(scheme.binary_groups)
    mapping = np.full(scheme.num_classes, -1, dtype=np.int64)
    for j, g in enumerate(groups):
        for cls in scheme.binary_groups[g]:
            mapping[scheme.index_of(cls)] = j
    if np.any(mapping < 0):
        missing = [scheme.classes[i] for i in np.flatnonzero(mapping < 0)]
        raise ValueError(f"task {scheme.name!r}: classes {missing} belong to no binary group")
    return mapping[np.asarray(y_true, dtype=np.int64)]


def scheme_metrics(y_true: np.ndarray, probs: np.ndarray, scheme: LabelScheme,
                   prefix: str = "val/") -> dict[str, float]:
    """Metrics over the scheme's classes; schemes with ``binary_groups`` (multi_to_binary)
    add every binary metric of the groups (healthy vs infected, positive = the last
    group) under ``f"{prefix}binary/..."``, from summed probabilities."""
    out = classification_metrics(y_true, probs, scheme.classes, prefix)
    if scheme.binary_groups:
        yb = binary_labels(y_true, scheme)
        pb = scheme.to_binary_probs(probs)
        out.update(classification_metrics(yb, pb, list(scheme.binary_groups), f"{prefix}binary/"))
    return out


def valid_metric_names(classes: Sequence[str], has_binary: bool | Sequence[str] = False,
                       prefix: str = "val/") -> list[str]:
    """Every key :func:`scheme_metrics` can produce. ``has_binary`` may be the binary
    group names; ``True`` means multi_to_binary's ``("healthy", "infected")``."""
    names = [prefix + m for m in metric_names(classes)]
    if has_binary:
        groups = ("healthy", "infected") if has_binary is True else tuple(has_binary)
        names += [f"{prefix}binary/{m}" for m in metric_names(groups)]
    return names


def check_metric_name(name: str, classes: Sequence[str], has_binary: bool | Sequence[str] = False,
                      *, prefix: str = "val/", where: str = "") -> None:
    """Raise ConfigError if the selection metric ``name`` (e.g. ``"val/f1_macro"``) is
    not one :func:`scheme_metrics` produces; the message lists the valid names."""
    valid = valid_metric_names(classes, has_binary, prefix)
    if name in valid:
        return
    src = f" (from {where})" if where else ""
    hint = ""
    if not name.startswith(prefix) and prefix + name in valid:
        hint = f"; did you mean {prefix + name!r}?"
    raise ConfigError(f"unknown selection metric {name!r}{src} for classes {list(classes)}{hint}; "
                      f"valid metrics: {', '.join(valid)}")
