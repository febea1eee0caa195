"""Evaluation figures: valid, non-blank PNGs whose numbers are metrics.py's / scikit-learn's."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrtune.data.labels import SCHEMES
from cxrtune.metrics import reliability_table, binary_labels, classification_metrics, expected_calibration_error
from cxrtune.report import figures
from cxrtune.report.figures import (
    calibration_png,
    confusion_png,
    evaluation_figures,
    learning_curves_png,
    roc_pr_png,
)

ABC = ("a", "b", "c")


def read_png(path):
    """The image as an array, after checking it is a plausible, non-blank figure."""
    from matplotlib.image import imread

    assert path.exists() and path.stat().st_size > 0, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 200, img.shape
    assert img[..., :3].var() > 0, f"{path} is blank"
    return img


def fake_probs(y, num_classes, seed=0, signal=1.5, decimals=None):
    """Softmax of noise with ``signal`` added to the true class (rounded to force ties)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), num_classes))
    logits[np.arange(len(y)), y] += signal
    if decimals is not None:
        logits = np.round(logits, decimals)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def labels(n, num_classes, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, n)


def test_confusion_two_panels_and_old_signature(tmp_path):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]])
    # Positional (cm, names, path), as tracking.plots.confusion_png was called.
    out = confusion_png(cm, list(ABC), tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    img = read_png(out)
    assert img.shape[1] > 1.5 * img.shape[0]  # counts and fractions side by side
    # An empty row (class with no test images) must not divide by zero.
    read_png(confusion_png(np.array([[3, 1], [0, 0]]), ["x", "y"], str(tmp_path / "cm2.png"), title="t"))


def test_confusion_shape_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        confusion_png(np.eye(2), list(ABC), tmp_path / "cm.png")


def test_roc_pr_multiclass_equals_sklearn_and_metrics(tmp_path):
    y = labels(300, 3)
    p = fake_probs(y, 3, decimals=1)  # ties exercise the threshold handling
    scores = roc_pr_png(y, p, ABC, tmp_path / "rp.png")
    read_png(tmp_path / "rp.png")
    assert set(scores) == {f"{m}/{c}" for m in ("roc_auc", "pr_auc") for c in ABC}
    for k, cls in enumerate(ABC):
        assert scores[f"roc_auc/{cls}"] == pytest.approx(roc_auc_score(y == k, p[:, k]), abs=1e-12)
        assert scores[f"pr_auc/{cls}"] == pytest.approx(average_precision_score(y == k, p[:, k]), abs=1e-12)
    m = classification_metrics(y, p, ABC)
    assert np.mean([scores[f"roc_auc/{c}"] for c in ABC]) == pytest.approx(m["roc_auc_macro"])
    assert np.mean([scores[f"pr_auc/{c}"] for c in ABC]) == pytest.approx(m["pr_auc_macro"])


def test_roc_pr_two_classes_positive_only(tmp_path):
    y = labels(200, 2, seed=1)
    p = fake_probs(y, 2, seed=1)
    scores = roc_pr_png(y, p, ["normal", "pneumonia"], tmp_path / "rp.png")
    read_png(tmp_path / "rp.png")
    assert set(scores) == {"roc_auc/pneumonia", "pr_auc/pneumonia"}
    m = classification_metrics(y, p, ["normal", "pneumonia"])
    assert scores["roc_auc/pneumonia"] == pytest.approx(m["roc_auc_macro"], abs=1e-12)
    assert scores["pr_auc/pneumonia"] == pytest.approx(m["pr_auc_macro"], abs=1e-12)


def test_roc_pr_absent_classes_skipped(tmp_path):
    y = labels(120, 2, seed=2)  # class 2 ("c") never occurs
    p = fake_probs(y, 3, seed=2)
    scores = roc_pr_png(y, p, ABC, tmp_path / "rp.png")
    read_png(tmp_path / "rp.png")
    assert set(scores) == {"roc_auc/a", "roc_auc/b", "pr_auc/a", "pr_auc/b"}
    # A single class present: no curve is defined, the figure still comes out.
    assert roc_pr_png(np.zeros(30, dtype=int), fake_probs(np.zeros(30, dtype=int), 3), ABC,
                      tmp_path / "one.png") == {}
    read_png(tmp_path / "one.png")
    # Two classes with the positive one absent: nothing drawn either.
    y2 = np.zeros(20, dtype=int)
    assert roc_pr_png(y2, fake_probs(y2, 2), ["n", "p"], tmp_path / "two.png") == {}
    read_png(tmp_path / "two.png")


def test_roc_pr_rejects_bad_probs(tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        roc_pr_png(np.array([0, 1]), np.array([[0.9, 0.9], [0.1, 0.1]]), ["n", "p"], tmp_path / "x.png")


@pytest.mark.parametrize("bins", [15, 4, 1])
def test_calibration_ece_is_metrics_ece(tmp_path, bins):
    y = labels(400, 3, seed=3)
    p = fake_probs(y, 3, seed=3, signal=2.0)
    # Confidences exactly on bin edges (and 1.0) must fall in the same bin as metrics.py's.
    p[:3] = [[0.6, 0.2, 0.2], [1.0, 0.0, 0.0], [0.4, 0.4, 0.2]]
    ece = calibration_png(y, p, tmp_path / "cal.png", bins=bins)
    read_png(tmp_path / "cal.png")
    assert ece == expected_calibration_error(y, p, bins)
    if bins == 15:
        assert ece == classification_metrics(y, p, ABC)["ece"]
    counts, accuracy, confidence = reliability_table(y, p, bins)
    assert counts.sum() == len(y)
    filled = counts > 0
    recomputed = np.sum(counts[filled] / len(y) * np.abs(accuracy[filled] - confidence[filled]))
    assert recomputed == pytest.approx(ece, abs=1e-12)


def test_calibration_bad_bins(tmp_path):
    y = labels(10, 2)
    with pytest.raises(ValueError, match="0"):
        calibration_png(y, fake_probs(y, 2), tmp_path / "cal.png", bins=0)


def history(epochs, seed, metric="val/f1_macro", gaps=False):
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train/loss": 1 / e + rng.random() * 0.1, "val/loss": 1.1 / e + rng.random() * 0.1,
               metric: 1 - 1 / (e + 1)}
        if gaps and e % 2 == 0:
            del row["val/loss"], row[metric]  # validation not run every epoch
        rows.append(row)
    return rows


def capture_figure(monkeypatch):
    """Keep the figure ``save_png`` is given, so that its artists can be inspected."""
    seen = []
    real = figures.save_png

    def keep(fig, path):
        seen.append(fig)
        return real(fig, path)

    monkeypatch.setattr(figures, "save_png", keep)
    return seen


def test_learning_curves_best_bold_and_legend_limited(tmp_path, monkeypatch):
    seen = capture_figure(monkeypatch)
    curves = {f"trial_{i:02d}": history(6, i, gaps=i % 3 == 0) for i in range(20)}
    curves["trial_05"][2].pop("train/loss")
    curves["trial_07"].append({"epoch": 7, "train/loss": math.nan})  # diverged: nothing to draw
    out = learning_curves_png(curves, "val/f1_macro", tmp_path / "lc.png", best="trial_05")
    read_png(out)
    loss_ax, metric_ax = seen[0].axes
    texts = [t.get_text() for t in metric_ax.get_legend().get_texts()]
    assert len(texts) <= figures._MAX_LEGEND + 1
    assert "trial_05 (best)" in texts
    assert any(t.startswith("+") and "more" in t for t in texts)
    widths = {line.get_label(): line.get_linewidth() for line in metric_ax.get_lines()}
    assert widths["trial_05 (best)"] > max(w for k, w in widths.items() if k != "trial_05 (best)")
    # train solid + validation dashed per trial on the loss panel
    styles = {line.get_linestyle() for line in loss_ax.get_lines()}
    assert {"-", "--"} <= styles


def test_learning_curves_degenerate_inputs(tmp_path):
    read_png(learning_curves_png({}, "val/f1_macro", tmp_path / "empty.png"))
    curves = {1: [{"train/loss": 0.5}], 2: history(3, 2)}  # no "epoch", no metric, int labels
    read_png(learning_curves_png(curves, "val/f1_macro", tmp_path / "few.png", best="missing"))


@pytest.mark.parametrize("task", SCHEMES.names())
def test_evaluation_figures_binary_only_for_multi_to_binary(tmp_path, monkeypatch, task):
    scheme = SCHEMES.get(task)
    y = labels(150, scheme.num_classes, seed=4)
    p = fake_probs(y, scheme.num_classes, seed=4)
    calls = []
    real = figures.roc_pr_png

    def spy(y_, p_, names, path):
        calls.append((np.asarray(y_), np.asarray(p_), list(names)))
        return real(y_, p_, names, path)

    monkeypatch.setattr(figures, "roc_pr_png", spy)
    paths = evaluation_figures(y, p, scheme, tmp_path / "figs", prefix="test")
    base = {"confusion", "roc_pr", "calibration"}
    expected = base | ({f"binary_{k}" for k in base} if scheme.binary_groups else set())
    assert set(paths) == expected
    assert (task == "multi_to_binary") == bool(scheme.binary_groups)
    for key, path in paths.items():
        assert path == tmp_path / "figs" / f"test_{key}.png"
        read_png(path)
    if scheme.binary_groups:
        # Binary labels and summed probabilities exactly as metrics.scheme_metrics builds them.
        yb, pb, names = calls[1]
        assert names == list(scheme.binary_groups)
        np.testing.assert_array_equal(yb, binary_labels(y, scheme))
        np.testing.assert_array_equal(pb, scheme.to_binary_probs(p))


def test_evaluation_figures_with_absent_class(tmp_path):
    scheme = SCHEMES.get("multi_to_binary")
    y = np.array([0, 1] * 30)  # no "viral" in the test split
    paths = evaluation_figures(y, fake_probs(y, 3, seed=5), scheme, tmp_path, prefix="holdout")
    assert paths["confusion"].name == "holdout_confusion.png"
    for path in paths.values():
        read_png(path)
