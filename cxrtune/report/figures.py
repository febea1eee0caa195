"""Evaluation figures of a model on the held-out test split, as PNG files.

What a finished search shows about its best model: the confusion matrix (counts and
row-normalised fractions), one-vs-rest ROC and precision-recall curves, a reliability
diagram with the ECE, and the learning curves of the trials. The numbers drawn are the
numbers :mod:`cxrtune.metrics` reports: two-class problems show the positive class
(index 1) only, classes absent from the test labels are skipped (and said so), the ECE
is metrics.py's own, and for ``multi_to_binary`` the binary groups are built exactly as
:func:`cxrtune.metrics.scheme_metrics` builds them.

matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` (no pyplot: no global state,
no GUI backend in worker processes) and, like scikit-learn, imported inside the functions
so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np

from ..data.labels import LabelScheme
from ..metrics import _check_inputs, binary_labels, confusion, expected_calibration_error, reliability_table

log = logging.getLogger(__name__)

_DPI = 100
# More legend entries than this make the learning-curve legend unreadable.
_MAX_LEGEND = 8


def new_figure(width: float, height: float) -> Any:
    """A pyplot-free figure with an Agg canvas attached (so ``savefig`` works)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path | str | BinaryIO) -> Path | BinaryIO:
    """Save ``fig`` as a PNG file (its folder made) or into a binary stream."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- confusion

def _matrix_panel(ax: Any, values: np.ndarray, text: np.ndarray, names: Sequence[str],
                  title: str, vmax: float) -> None:
    """One heat-map panel of ``values`` annotated with the strings of ``text``."""
    n = len(names)
    ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            dark = vmax > 0 and values[i, j] > 0.5 * vmax
            ax.text(j, i, text[i, j], ha="center", va="center", color="white" if dark else "black")
    ax.set_title(title)


def confusion_png(cm: Any, names: Sequence[str], path: Path | str,
                  title: str = "confusion matrix (test)") -> Path:
    """Two panels side by side: the counts of ``cm`` (rows: true class, columns:
    predicted) and the row-normalised fractions (recall of each true class on the
    diagonal). A class without images has an all-zero row of fractions."""
    cm = np.asarray(cm)
    n = len(names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names {list(names)}")
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = max(3.5, 0.9 * n + 2)
    fig = new_figure(2 * side, side)
    counts_ax, frac_ax = fig.subplots(1, 2)
    count_text = np.vectorize(lambda v: f"{v:g}")(cm) if cm.size else cm
    frac_text = np.vectorize(lambda v: f"{v:.2f}")(frac) if frac.size else frac
    _matrix_panel(counts_ax, cm.astype(np.float64), count_text, names, "counts", float(max(cm.max(initial=0), 1)))
    _matrix_panel(frac_ax, frac, frac_text, names, "fraction of true class", 1.0)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


# --------------------------------------------------------------------------- ROC / PR

def _drawable_classes(y: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    """Classes whose one-vs-rest curves are defined, and those skipped.

    Two classes: only the positive class (index 1), as metrics.py scores it. A class's
    curves need positives and negatives, so a class absent from ``y`` (or the only one
    present) is skipped.
    """
    candidates = [1] if num_classes == 2 else list(range(num_classes))
    present = set(np.unique(y).tolist())
    if len(present) < 2:
        return [], candidates
    drawn = [k for k in candidates if k in present]
    return drawn, [k for k in candidates if k not in present]


def roc_pr_png(y_true: Any, probs: Any, names: Sequence[str], path: Path | str) -> dict[str, float]:
    """ROC curves (left) and precision-recall curves (right), one-vs-rest per class.

    Returns ``{"roc_auc/<class>": ..., "pr_auc/<class>": ...}`` (ROC-AUC and average
    precision, scikit-learn's values) for the classes drawn; skipped classes are named in
    the figure. Their mean over the drawn classes is metrics.py's ``roc_auc_macro`` /
    ``pr_auc_macro``.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y, p = _check_inputs(y_true, probs, len(names))
    drawn, skipped = _drawable_classes(y, len(names))
    fig = new_figure(11, 4.8)
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    scores: dict[str, float] = {}
    for k in drawn:
        positive = (y == k).astype(np.int64)
        colour = f"C{k % 10}"
        fpr, tpr, _ = roc_curve(positive, p[:, k])
        auc = float(roc_auc_score(positive, p[:, k]))
        precision, recall, _ = precision_recall_curve(positive, p[:, k])
        ap = float(average_precision_score(positive, p[:, k]))
        roc_ax.plot(fpr, tpr, color=colour, lw=1.6, label=f"{names[k]} (AUC {auc:.3f})")
        pr_ax.step(recall, precision, where="post", color=colour, lw=1.6, label=f"{names[k]} (AP {ap:.3f})")
        # A random ranking's precision is the class prevalence: the PR chance line.
        pr_ax.axhline(positive.mean(), color=colour, lw=0.6, ls=":", alpha=0.7)
        scores[f"roc_auc/{names[k]}"] = auc
        scores[f"pr_auc/{names[k]}"] = ap
    note = _finish_roc_pr(roc_ax, pr_ax, names, drawn, skipped, len(names) == 2)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=9, color="firebrick")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    save_png(fig, path)
    return scores


def _finish_roc_pr(roc_ax: Any, pr_ax: Any, names: Sequence[str], drawn: list[int],
                   skipped: list[int], two_class: bool) -> str:
    """Axes labels, titles and legends; returns the note naming the skipped classes."""
    which = f"positive class {names[1]!r}" if two_class else "one-vs-rest"
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate (1 - specificity)",
               ylabel="true positive rate (sensitivity)", title=f"ROC, {which}")
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (sensitivity)", ylabel="precision",
              title=f"precision-recall, {which}")
    roc_ax.legend(loc="lower right", fontsize=8)
    if drawn:
        pr_ax.legend(loc="lower left", fontsize=8)
    if not skipped:
        return ""
    why = "absent from the test labels" if drawn else "fewer than two classes in the test labels"
    return f"not drawn ({why}): {', '.join(names[k] for k in skipped)}"


# --------------------------------------------------------------------------- calibration

def calibration_png(y_true: Any, probs: Any, path: Path | str, bins: int = 15) -> float:
    """Reliability diagram of the top-label confidence, with the images per bin underneath.

    Returns the ECE, which is ``metrics.expected_calibration_error`` of the same inputs.
    """
    ece = expected_calibration_error(y_true, probs, bins)
    counts, accuracy, confidence = reliability_table(y_true, probs, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / bins
    fig = new_figure(5.5, 6.5)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    rel_ax = fig.add_subplot(grid[0])
    hist_ax = fig.add_subplot(grid[1], sharex=rel_ax)
    filled = counts > 0
    rel_ax.bar(centres[filled], accuracy[filled], width=width, color="C0", edgecolor="white",
               alpha=0.85, label="accuracy in bin")
    rel_ax.plot(centres[filled], confidence[filled], "o", color="C3", ms=4, label="mean confidence in bin")
    rel_ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    rel_ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy",
               title=f"reliability (top-label confidence), ECE = {ece:.3f}")
    rel_ax.tick_params(labelbottom=False)
    rel_ax.legend(loc="upper left", fontsize=8)
    hist_ax.bar(centres, counts, width=width, color="grey", edgecolor="white")
    hist_ax.set(xlabel="confidence (max class probability)", ylabel="images")
    fig.subplots_adjust(left=0.14, right=0.97, top=0.94, bottom=0.09)
    save_png(fig, path)
    return ece


# --------------------------------------------------------------------------- learning curves

def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the epochs that have a finite value of it.

    An entry without "epoch" is placed by its position (1-based), as trackers log it.
    """
    xs: list[float] = []
    ys: list[float] = []
    for pos, row in enumerate(history):
        value = row.get(key)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value):
            continue
        epoch = row.get("epoch")
        xs.append(float(epoch) if epoch is not None else float(pos + 1))
        ys.append(value)
    return xs, ys


def _trial_order(curves: Mapping[Any, Sequence[Mapping[str, Any]]], best: Any) -> list[Any]:
    """Trials to draw, the best last so that it lies on top."""
    labels = list(curves)
    if best is not None and best not in curves:
        log.warning("best trial %r has no learning curve; all %d trials drawn alike", best, len(labels))
    return [t for t in labels if t != best] + ([best] if best in curves else [])


def learning_curves_png(curves: Mapping[Any, Sequence[Mapping[str, Any]]], metric: str,
                        path: Path | str, best: Any = None) -> Path:
    """Losses (train solid, validation dashed; left) and ``metric`` (right) per epoch.

    ``curves`` maps a trial label to its per-epoch history (dicts with "epoch",
    "train/loss", "val/loss", ``metric``; any may be missing in an epoch). The ``best``
    trial is drawn bold on top, the others thin and translucent; the legend lists the
    best and at most a handful of others, and says how many it leaves out.
    """
    fig = new_figure(12, 4.8)
    loss_ax, metric_ax = fig.subplots(1, 2)
    order = _trial_order(curves, best)
    in_legend = 0
    hidden = 0
    for i, trial in enumerate(order):
        is_best = best is not None and trial == best
        style = {"lw": 2.4, "alpha": 1.0, "zorder": 3} if is_best else {"lw": 0.9, "alpha": 0.45, "zorder": 2}
        colour = "black" if is_best else f"C{i % 10}"
        show = is_best or in_legend < _MAX_LEGEND - 1
        if not is_best:
            in_legend += show
            hidden += not show
        name = f"{trial} (best)" if is_best else str(trial)
        _plot_trial(loss_ax, metric_ax, curves[trial], metric, colour, style, name if show else None)
    _finish_learning_curves(loss_ax, metric_ax, metric, hidden, bool(order))
    fig.tight_layout()
    return save_png(fig, path)


def _plot_trial(loss_ax: Any, metric_ax: Any, history: Sequence[Mapping[str, Any]], metric: str,
                colour: str, style: dict[str, Any], label: str | None) -> None:
    """One trial's train/val loss and metric lines; ``label`` None keeps it out of the legend."""
    x, v = _series(history, "train/loss")
    if x:
        loss_ax.plot(x, v, color=colour, ls="-", marker="." if len(x) == 1 else None, **style)
    x, v = _series(history, "val/loss")
    if x:
        loss_ax.plot(x, v, color=colour, ls="--", marker="." if len(x) == 1 else None, **style)
    x, v = _series(history, metric)
    if x:
        metric_ax.plot(x, v, color=colour, marker="." if len(x) == 1 else None,
                       label=label if label is not None else "_nolegend_", **style)


def _finish_learning_curves(loss_ax: Any, metric_ax: Any, metric: str, hidden: int, any_trial: bool) -> None:
    from matplotlib.lines import Line2D

    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (train solid, validation dashed)")
    metric_ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    if not any_trial:
        for ax in (loss_ax, metric_ax):
            ax.text(0.5, 0.5, "no learning curves recorded", transform=ax.transAxes, ha="center", va="center")
        return
    loss_ax.legend(handles=[Line2D([], [], color="grey", ls="-", label="train"),
                            Line2D([], [], color="grey", ls="--", label="validation")], fontsize=8)
    handles, labels = metric_ax.get_legend_handles_labels()
    # The best trial is drawn last (on top) but listed first.
    entries = sorted(zip(handles, labels), key=lambda hl: not hl[1].endswith(" (best)"))
    handles, labels = [h for h, _ in entries], [lab for _, lab in entries]
    if hidden:
        handles.append(Line2D([], [], color="none"))
        labels.append(f"+{hidden} more trial(s)")
    if handles:
        metric_ax.legend(handles, labels, fontsize=8, title="trial", title_fontsize=8)


# --------------------------------------------------------------------------- all of them

def _three_figures(y: np.ndarray, p: np.ndarray, names: Sequence[str], out_dir: Path,
                   stem: str, title: str) -> dict[str, Path]:
    """Confusion, ROC/PR and calibration PNGs named ``{stem}confusion.png`` etc."""
    cm = confusion(y, p.argmax(axis=1), len(names))
    paths = {"confusion": confusion_png(cm, names, out_dir / f"{stem}confusion.png", title=title)}
    paths["roc_pr"] = out_dir / f"{stem}roc_pr.png"
    aucs = roc_pr_png(y, p, names, paths["roc_pr"])
    paths["calibration"] = out_dir / f"{stem}calibration.png"
    ece = calibration_png(y, p, paths["calibration"])
    log.debug("figures %s*: %s, ece %.4f", stem, aucs, ece)
    return paths


def evaluation_figures(y_true: Any, probs: Any, scheme: LabelScheme, out_dir: Path | str,
                       prefix: str = "test") -> dict[str, Path]:
    """Confusion, ROC/PR and calibration PNGs of the scheme's classes, keyed "confusion",
    "roc_pr", "calibration" (files ``f"{prefix}_confusion.png"`` ...); schemes with
    ``binary_groups`` add the same three for the groups ("binary_confusion", ...; files
    ``f"{prefix}_binary_confusion.png"`` ...), from binary labels and summed
    probabilities as in :func:`cxrtune.metrics.scheme_metrics`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, p = _check_inputs(y_true, probs, scheme.num_classes)
    paths = _three_figures(y, p, list(scheme.classes), out_dir, f"{prefix}_",
                           f"confusion matrix ({prefix})")
    if scheme.binary_groups:
        yb = binary_labels(y, scheme)
        pb = scheme.to_binary_probs(p)
        binary = _three_figures(yb, pb, list(scheme.binary_groups), out_dir, f"{prefix}_binary_",
                                f"confusion matrix, {' vs '.join(scheme.binary_groups)} ({prefix})")
        paths.update({f"binary_{k}": v for k, v in binary.items()})
    return paths
