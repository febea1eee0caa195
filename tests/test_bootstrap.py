"""Bootstrap intervals: seeded, patient-grouped, NaN-tolerant, and fast metrics equal to metrics.py."""

import functools
import math
import warnings
from collections import Counter

import numpy as np
import pytest

from cxrtune.data.labels import SCHEMES
from cxrtune.metrics import classification_metrics, scheme_metrics
from cxrtune.report.bootstrap import bootstrap_intervals, fast_classification_metrics, fast_scheme_metrics

ABC = ("a", "b", "c")


def sample(n, num_classes=3, seed=0, signal=1.5, decimals=None):
    """Labels and softmax probabilities with ``signal`` on the true class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), y] += signal
    if decimals is not None:
        logits = np.round(logits, decimals)  # ties in the scores
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def assert_same_metrics(expected, got):
    assert list(got) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


FAST_ABC = functools.partial(fast_classification_metrics, classes=ABC)


# --------------------------------------------------------------------------- fast metrics

@pytest.mark.parametrize("seed", range(40))
def test_fast_metrics_equal_metrics_py(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 5))
    n = int(rng.integers(1, 80))
    y, p = sample(n, c, seed, signal=float(rng.uniform(0, 3)), decimals=1 if seed % 2 else None)
    if seed % 5 == 0:
        y[y == 0] = 1  # a class absent from y_true
    classes = [f"k{i}" for i in range(c)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about degenerate cases
        expected = classification_metrics(y, p, classes, prefix="test/")
    assert_same_metrics(expected, fast_classification_metrics(y, p, classes, prefix="test/"))


@pytest.mark.parametrize("task", SCHEMES.names())
def test_fast_scheme_metrics_equal_scheme_metrics(task):
    scheme = SCHEMES.get(task)
    y, p = sample(250, scheme.num_classes, seed=7, decimals=1)
    assert_same_metrics(scheme_metrics(y, p, scheme, "test/"), fast_scheme_metrics(y, p, scheme, "test/"))


def test_fast_metrics_constant_scores_and_single_class():
    y = np.array([0, 1, 1, 2, 0, 2])
    p = np.full((6, 3), 1 / 3)  # every score tied
    assert_same_metrics(classification_metrics(y, p, ABC), FAST_ABC(y, p))
    y1 = np.zeros(5, dtype=int)
    assert_same_metrics(classification_metrics(y1, sample(5)[1], ABC), FAST_ABC(y1, sample(5)[1]))


def test_fast_metrics_check_inputs_like_metrics_py():
    with pytest.raises(ValueError, match="sum to 1"):
        FAST_ABC(np.array([0, 1]), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        FAST_ABC(np.array([0, 3]), np.full((2, 3), 1 / 3))


# --------------------------------------------------------------------------- intervals

def width(interval):
    return interval[1] - interval[0]


def test_seeded_reproducible():
    y, p = sample(200, seed=1)
    groups = np.arange(200) // 3
    a = bootstrap_intervals(y, p, groups, FAST_ABC, n=200, seed=5)
    b = bootstrap_intervals(y, p, groups, FAST_ABC, n=200, seed=5)
    c = bootstrap_intervals(y, p, groups, FAST_ABC, n=200, seed=6)
    assert a == b
    assert a != c
    assert list(a) == list(FAST_ABC(y, p))  # every metric, in metrics_fn's order


def test_point_estimate_inside_interval():
    y, p = sample(600, seed=2)
    point = FAST_ABC(y, p)
    ci = bootstrap_intervals(y, p, None, FAST_ABC, n=400, seed=0)
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro", "pr_auc_macro",
                "sensitivity/a", "specificity/b"):
        lo, hi = ci[key]
        assert lo < point[key] < hi, (key, lo, point[key], hi)
        assert 0 < width(ci[key]) < 0.2, key


def test_level_widens_interval():
    y, p = sample(300, seed=3)
    narrow = bootstrap_intervals(y, p, None, FAST_ABC, n=300, level=0.5)
    wide = bootstrap_intervals(y, p, None, FAST_ABC, n=300, level=0.99)
    assert width(wide["accuracy"]) > width(narrow["accuracy"])


def test_intervals_shrink_with_more_data():
    small = bootstrap_intervals(*sample(100, seed=4), None, FAST_ABC, n=300)
    large = bootstrap_intervals(*sample(1600, seed=4), None, FAST_ABC, n=300)
    for key in ("accuracy", "f1_macro", "roc_auc_macro"):
        # sqrt(16) = 4 times narrower in theory; 2 leaves room for sampling noise
        assert width(small[key]) > 2 * width(large[key]), key


def test_groups_keep_a_patients_images_together():
    sizes = [1, 2, 3, 5, 1, 4, 2, 6]
    groups = np.repeat([f"p{i}" for i in range(len(sizes))], sizes)
    shuffled = np.random.default_rng(0).permutation(len(groups))
    groups = groups[shuffled]  # a patient's images need not be adjacent
    ids = np.arange(len(groups))  # y_true carries the image index: the resample is visible
    seen = []

    def record(y, p):
        seen.append(Counter(y.tolist()))
        return {"size": float(len(y))}

    bootstrap_intervals(ids, np.zeros((len(ids), 1)), groups, record, n=50)
    assert len(seen) == 50
    for counts in seen:
        for g in set(groups.tolist()):
            members = ids[groups == g]
            drawn = {counts.get(i, 0) for i in members}
            assert len(drawn) == 1, (g, drawn)  # all of the patient's images, or none
        assert sum(counts.values()) == sum(sizes[int(g[1:])] * counts[ids[groups == g][0]]
                                           for g in set(groups.tolist()))
    # Whole groups vary the resample size; images alone keep it at n.
    assert len({sum(c.values()) for c in seen}) > 1
    seen.clear()
    bootstrap_intervals(ids, np.zeros((len(ids), 1)), None, record, n=20)
    assert {sum(c.values()) for c in seen} == {len(ids)}


def test_missing_group_keys_are_single_images():
    ids = np.arange(6)
    groups = ["p1", "p1", None, None, float("nan"), "p2"]
    seen = []

    def record(y, p):
        seen.append(Counter(y.tolist()))
        return {"x": 0.0}

    bootstrap_intervals(ids, np.zeros((6, 1)), groups, record, n=200)
    # Images 2, 3, 4 (no key) are drawn independently: sometimes apart.
    assert any(c.get(2, 0) != c.get(3, 0) for c in seen)
    assert all(c.get(0, 0) == c.get(1, 0) for c in seen)


def test_correlated_patients_give_wider_intervals():
    # 40 patients x 10 identical images: 40 pieces of evidence, not 400.
    y, p = sample(40, seed=8, signal=0.8)
    y, p = np.repeat(y, 10), np.repeat(p, 10, axis=0)
    groups = np.repeat(np.arange(40), 10)
    by_patient = bootstrap_intervals(y, p, groups, FAST_ABC, n=300)
    by_image = bootstrap_intervals(y, p, None, FAST_ABC, n=300)
    for key in ("accuracy", "f1_macro"):
        assert width(by_patient[key]) > 2 * width(by_image[key]), key


def test_nan_resamples_left_out():
    y = np.array([0] * 29 + [1])  # one positive: some resamples have none
    p = np.column_stack([np.linspace(0.9, 0.1, 30), np.linspace(0.1, 0.9, 30)])
    seen_nan = []

    def metrics(y_, p_):
        m = fast_classification_metrics(y_, p_, ["n", "p"])
        seen_nan.append(math.isnan(m["roc_auc_macro"]))
        m["never"] = math.nan
        return m

    ci = bootstrap_intervals(y, p, None, metrics, n=200)
    assert any(seen_nan) and not all(seen_nan)
    assert all(math.isfinite(v) for v in ci["roc_auc_macro"])
    assert all(math.isnan(v) for v in ci["never"])


@pytest.mark.parametrize("kwargs, match", [
    ({"probs": np.full((4, 3), 1 / 3)}, "4 rows"),
    ({"groups": [1, 2]}, "groups has 2"),
    ({"n": 0}, "got 0"),
    ({"n": 2.5}, "got 2.5"),
    ({"level": 0.0}, r"got 0\.0"),
    ({"level": 1}, "got 1"),
    ({"level": 95}, "got 95"),
    ({"y_true": np.zeros((5, 2), dtype=int)}, r"\(5, 2\)"),
    ({"y_true": np.array([], dtype=int), "probs": np.zeros((0, 3))}, "empty"),
])
def test_bad_inputs_raise_naming_the_value(kwargs, match):
    args = {"y_true": np.array([0, 1, 2, 0, 1]), "probs": np.full((5, 3), 1 / 3), "groups": None,
            "metrics_fn": FAST_ABC}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bootstrap_intervals(**args)
