import math
import warnings

import numpy as np
import pytest

from cxrtune.data.labels import SCHEMES
from cxrtune.errors import ConfigError
from cxrtune.metrics import (
    check_metric_name,
    classification_metrics,
    confusion,
    expected_calibration_error,
    metric_names,
    scheme_metrics,
)

ABC = ("a", "b", "c")


def probs_for(pred, num_classes, conf=0.6):
    """Rows with ``conf`` on the predicted class, the rest spread evenly."""
    p = np.full((len(pred), num_classes), (1 - conf) / (num_classes - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_perfect_predictions():
    y = np.array([0, 1, 2, 0, 1, 2])
    conf = np.array([0.9, 0.8, 1.0, 0.7, 0.95, 0.6])
    p = np.zeros((6, 3))
    p[np.arange(6), y] = conf
    p[np.arange(6), (y + 1) % 3] = 1 - conf
    m = classification_metrics(y, p, ABC, prefix="val/")
    assert list(m) == ["val/" + k for k in metric_names(ABC)]
    assert all(type(v) is float for v in m.values())
    for k in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc_macro", "pr_auc_macro",
              "sensitivity/b", "specificity/c", "f1/a"):
        assert m[f"val/{k}"] == pytest.approx(1.0), k
    assert m["val/ece"] == pytest.approx(1 - conf.mean())


def test_three_class_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    # confusion rows (true): a: [2,1,0]  b: [0,2,0]  c: [1,0,2]
    assert confusion(y, pred, 3).tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    m = classification_metrics(y, probs_for(pred, 3), ABC)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # recalls 2/3, 2/2, 2/3
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["sensitivity/a"] == pytest.approx(2 / 3)
    assert m["sensitivity/b"] == pytest.approx(1.0)
    assert m["sensitivity/c"] == pytest.approx(2 / 3)
    # specificity: TN / (TN + FP) one-vs-rest
    assert m["specificity/a"] == pytest.approx(4 / 5)  # 5 non-a, 1 predicted a
    assert m["specificity/b"] == pytest.approx(5 / 6)  # 6 non-b, 1 predicted b
    assert m["specificity/c"] == pytest.approx(1.0)  # 5 non-c, none predicted c
    # precisions 2/3, 2/3, 1 -> F1 2/3, 4/5, 4/5
    assert m["f1/a"] == pytest.approx(2 / 3)
    assert m["f1/b"] == pytest.approx(4 / 5)
    assert m["f1/c"] == pytest.approx(4 / 5)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 4 / 5 + 4 / 5) / 3)
    assert m["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 4 / 5 + 3 * 4 / 5) / 8)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])
    assert "sensitivity" not in m and "specificity" not in m


def test_binary_sensitivity_specificity_and_auc():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9, 0.4])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), ("normal", "pneumonia"))
    assert m["sensitivity"] == pytest.approx(3 / 4) == m["sensitivity/pneumonia"]
    assert m["specificity"] == pytest.approx(2 / 3) == m["specificity/pneumonia"]
    assert m["specificity/normal"] == pytest.approx(3 / 4)
    # 11 of 12 positive/negative pairs ranked correctly (0.4 < 0.6)
    assert m["roc_auc_macro"] == pytest.approx(11 / 12)


def test_multi_to_binary_scores_summed_probabilities():
    scheme = SCHEMES.get("multi_to_binary")
    y = np.array([0, 1, 2, 0])  # normal, bacterial, viral, normal
    p = np.array([[0.6, 0.2, 0.2],
                  [0.4, 0.3, 0.3],  # predicted normal, but infected = 0.6
                  [0.1, 0.5, 0.4],  # predicted bacterial, but it is viral
                  [0.7, 0.2, 0.1]])
    m = scheme_metrics(y, p, scheme)
    assert m["val/accuracy"] == pytest.approx(0.5)
    for k in ("accuracy", "sensitivity", "specificity", "roc_auc_macro", "f1/infected", "f1_macro"):
        assert m[f"val/binary/{k}"] == pytest.approx(1.0), k
    assert m["val/binary/ece"] == pytest.approx(1 - (0.6 + 0.6 + 0.9 + 0.7) / 4)
    assert set(m) == {"val/" + k for k in metric_names(scheme.classes)} | {
        "val/binary/" + k for k in metric_names(("healthy", "infected"))}
    assert not any("binary" in k for k in scheme_metrics(y, p, SCHEMES.get("three_class")))


def test_ece_hand_example():
    p = np.array([[0.9, 0.1],    # conf .9 right  -> bin (.8, 1]
                  [0.75, 0.25],  # conf .75 wrong -> bin (.6, .8]
                  [0.3, 0.7],    # conf .7 right  -> bin (.6, .8]
                  [0.45, 0.55]])  # conf .55 wrong -> bin (.4, .6]
    y = np.array([0, 1, 1, 0])
    expected = (1 * abs(1 - 0.9) + 2 * abs(0.5 - 0.725) + 1 * abs(0 - 0.55)) / 4
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(expected)
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(abs(0.5 - 0.725))


def test_absent_class_does_not_crash_or_warn():
    y = np.array([0, 0, 1, 1])  # class c never occurs
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, p, ABC)
        single = classification_metrics(np.zeros(3, dtype=int), p[:3], ABC)
        binary_single = classification_metrics(np.ones(2, dtype=int), p[:2, :2] / p[:2, :2].sum(1, keepdims=True),
                                               ("x", "y"))
    assert m["roc_auc_macro"] == pytest.approx((3 / 4 + 1) / 2)  # macro over a (0.2 < 0.3) and b only
    assert m["sensitivity/c"] == 0.0 and m["f1/c"] == 0.0
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert math.isnan(single["roc_auc_macro"]) and math.isnan(single["pr_auc_macro"])
    assert single["accuracy"] == pytest.approx(1 / 3)  # argmax 0, 2, 1
    assert math.isnan(binary_single["roc_auc_macro"])
    assert confusion(y, p.argmax(1), 3).shape == (3, 3)


def test_bad_inputs_raise():
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(y, np.array([[2.0, -1.0], [3.0, 1.0]]), ("x", "y"))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(y, np.array([[0.5, 0.5]]), ("x", "y"))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(y, np.array([[np.nan, 0.5], [0.5, 0.5]]), ("x", "y"))


def test_check_metric_name():
    check_metric_name("val/f1_macro", ABC, has_binary=False)
    check_metric_name("val/sensitivity/b", ABC, has_binary=False)
    check_metric_name("val/binary/sensitivity", ABC, has_binary=True)
    with pytest.raises(ConfigError) as e:
        check_metric_name("val/f1", ABC, has_binary=False, where="search.yaml: select_metric")
    msg = str(e.value)
    assert "'val/f1'" in msg and "search.yaml" in msg and "val/f1_macro" in msg and "val/ece" in msg
    with pytest.raises(ConfigError, match="val/binary/roc_auc_macro"):
        check_metric_name("val/binary/auc", ABC, has_binary=True)
    with pytest.raises(ConfigError):
        check_metric_name("val/binary/accuracy", ABC, has_binary=False)
    with pytest.raises(ConfigError, match="did you mean 'val/accuracy'"):
        check_metric_name("accuracy", ABC, has_binary=False)
    with pytest.raises(ConfigError):  # plain sensitivity only exists for 2 classes
        check_metric_name("val/sensitivity", ABC, has_binary=False)
    check_metric_name("val/sensitivity", ("normal", "pneumonia"), has_binary=False)


def test_binary_pr_auc_is_of_the_positive_class_like_roc_auc():
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9, 0.4])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), ("normal", "pneumonia"))
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, p1))
    assert m["pr_auc_macro"] == pytest.approx(average_precision_score(y, p1))
