from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np
import pytest

from cxrtune.data import cxrnorm
from cxrtune.data.cxrnorm import (
    METHODS,
    CXRNormConfig,
    apply,
    apply_batch,
    clear_memo_cache,
    memo_path,
    normalized,
    percentiles,
)
from cxrtune.errors import ConfigError

OFF = dict(clahe=False, median_kernel=1, stretch=False)


@pytest.fixture(autouse=True)
def _fresh_lru():
    clear_memo_cache()
    yield
    clear_memo_cache()


def low_contrast(seed: int = 0, size: int = 128) -> np.ndarray:
    """A smooth low-contrast 'X-ray': values within ~100..140 plus slight noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 120 + 15 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 2, (size, size))
    return np.clip(base, 0, 255).astype(np.uint8)


def local_std(img: np.ndarray, k: int = 15) -> float:
    f = img.astype(np.float64)
    mean = cv2.blur(f, (k, k))
    sq = cv2.blur(f * f, (k, k))
    return float(np.sqrt(np.maximum(sq - mean * mean, 0)).mean())


def stack(n: int = 6, size: int = 64) -> np.ndarray:
    return np.stack([low_contrast(seed=i, size=size) for i in range(n)])


# ---------------------------------------------------------------- the steps


def test_clahe_raises_local_contrast():
    img = low_contrast()
    out = apply(img, CXRNormConfig(clahe=True, clip_limit=2.0, tile_grid=8, median_kernel=1, stretch=False))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert local_std(out) > 1.5 * local_std(img)


def test_median_removes_salt_and_pepper():
    rng = np.random.default_rng(1)
    clean = np.full((64, 64), 120, np.uint8)
    noisy = clean.copy()
    mask = rng.random(noisy.shape)
    noisy[mask < 0.05] = 0
    noisy[mask > 0.95] = 255
    out = apply(noisy, CXRNormConfig(**{**OFF, "median_kernel": 5}))
    assert np.abs(noisy.astype(int) - clean).mean() > 5
    assert np.abs(out.astype(int) - clean).mean() < 0.5


def test_stretch_maps_percentiles_to_full_range():
    img = low_contrast()
    lo, hi = np.percentile(img, [2, 98])
    out = apply(img, CXRNormConfig(**{**OFF, "stretch": True, "low_pct": 2, "high_pct": 98}))
    olo, ohi = np.percentile(out, [2, 98])
    assert olo <= 3 and ohi >= 252
    assert (out == 0).mean() >= 0.01 and (out == 255).mean() >= 0.01
    # Linear with clipping, hence monotone.
    expected = np.clip(np.rint((img.astype(np.float64) - lo) * 255 / (hi - lo)), 0, 255)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    order = np.argsort(img.ravel(), kind="stable")
    assert (np.diff(out.ravel()[order].astype(int)) >= 0).all()


def test_histogram_percentiles_match_numpy():
    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 1000):
        img = rng.integers(0, 256, (1, n), dtype=np.uint8)
        for p in ((0, 100), (2, 98), (25, 75.5)):
            np.testing.assert_allclose(percentiles(img, p), np.percentile(img, p))


def test_stretch_on_constant_image_is_unchanged():
    img = np.full((32, 32), 77, np.uint8)
    out = apply(img, CXRNormConfig(**{**OFF, "stretch": True}))
    np.testing.assert_array_equal(out, img)
    # Full default pipeline on a flat image: no crash, no division by zero.
    out = apply(img, CXRNormConfig())
    assert out.dtype == np.uint8 and np.unique(out).size == 1


def test_full_pipeline_shapes_and_odd_sizes():
    img = low_contrast(size=37)[:, :23]
    out = apply(img, CXRNormConfig(tile_grid=16, median_kernel=7))
    assert out.shape == img.shape and out.dtype == np.uint8


def test_none_is_identity():
    img = low_contrast()
    assert apply(img, CXRNormConfig(method="none")) is img
    imgs = stack(3)
    assert normalized(imgs, "src", CXRNormConfig(method="none"), None) is imgs


def test_histeq_blur():
    img = low_contrast()
    out = apply(img, CXRNormConfig(method="histeq_blur"))
    expected = cv2.GaussianBlur(cv2.equalizeHist(img), (5, 5), 0)
    np.testing.assert_array_equal(out, expected)
    assert out.std() > 3 * img.std()


def test_rejects_non_uint8_or_non_2d():
    with pytest.raises(ValueError, match="2-D uint8"):
        apply(np.zeros((4, 4), np.float32), CXRNormConfig())
    with pytest.raises(ValueError, match="2-D uint8"):
        apply(np.zeros((4, 4, 3), np.uint8), CXRNormConfig())
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        apply_batch(np.zeros((4, 4), np.uint8), CXRNormConfig())


# ---------------------------------------------------------------- key()


def test_key_stable_and_sensitive():
    a = CXRNormConfig()
    assert a.key() == CXRNormConfig().key()
    assert isinstance(a.key(), str) and 6 <= len(a.key()) <= 16
    assert CXRNormConfig(clip_limit=2).key() == a.key()  # 2 == 2.0
    for change in (
        dict(clip_limit=3.0),
        dict(tile_grid=4),
        dict(median_kernel=3),
        dict(low_pct=1.0),
        dict(high_pct=99.0),
        dict(clahe=False),
        dict(stretch=False),
        dict(method="histeq_blur"),
    ):
        assert dataclasses.replace(a, **change).key() != a.key(), change


def test_key_ignores_disabled_step_params():
    assert CXRNormConfig(clahe=False, clip_limit=9.0, tile_grid=3).key() == CXRNormConfig(clahe=False).key()
    assert CXRNormConfig(stretch=False, low_pct=10, high_pct=20).key() == CXRNormConfig(stretch=False).key()
    none = CXRNormConfig(method="none")
    assert CXRNormConfig(method="none", clip_limit=5, median_kernel=9, low_pct=1).key() == none.key()
    hb = CXRNormConfig(method="histeq_blur")
    assert CXRNormConfig(method="histeq_blur", tile_grid=2, stretch=False).key() == hb.key()
    # cxrnorm with every step off is the identity.
    assert CXRNormConfig(**OFF).key() == none.key()
    assert CXRNormConfig(**OFF).is_identity


# ---------------------------------------------------------------- validate()


@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "clahe_only"),
        ("clip_limit", 0.0),
        ("clip_limit", -1.0),
        ("clip_limit", float("nan")),
        ("clip_limit", "2.0"),
        ("tile_grid", 0),
        ("tile_grid", 2.5),
        ("median_kernel", 4),
        ("median_kernel", 0),
        ("median_kernel", -3),
        ("median_kernel", 257),
        ("median_kernel", True),
        ("low_pct", -1.0),
        ("high_pct", 101.0),
        ("clahe", "yes"),
    ],
)
def test_invalid_param_raises(field, value):
    cfg = dataclasses.replace(CXRNormConfig(), **{field: value})
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    msg = str(ei.value)
    assert f"preprocess.{field}" in msg
    assert repr(value) in msg
    with pytest.raises(ConfigError):
        apply(low_contrast(size=16), cfg)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError) as ei:
        CXRNormConfig(method="bogus").validate(where="trial.pre")
    msg = str(ei.value)
    assert "trial.pre.method" in msg and "'bogus'" in msg
    for name in ("cxrnorm", "histeq_blur", "none"):
        assert name in msg


def test_low_not_below_high():
    with pytest.raises(ConfigError, match=r"preprocess\.low_pct = 98.*high_pct"):
        CXRNormConfig(low_pct=98, high_pct=98).validate()
    with pytest.raises(ConfigError, match="preprocess.low_pct"):
        CXRNormConfig(low_pct=60, high_pct=40).validate()


def test_all_problems_reported_at_once():
    cfg = CXRNormConfig(method="x", clip_limit=-2, tile_grid=0, median_kernel=4, low_pct=-5, high_pct=200)
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    msg = str(ei.value)
    for field, value in [
        ("method", "'x'"),
        ("clip_limit", "-2"),
        ("tile_grid", "0"),
        ("median_kernel", "4"),
        ("low_pct", "-5"),
        ("high_pct", "200"),
    ]:
        assert f"preprocess.{field} = {value}" in msg, field
    assert len(msg.splitlines()) == 7  # header + one line per problem


def test_valid_configs_pass():
    CXRNormConfig().validate()
    CXRNormConfig(method="histeq_blur").validate()
    CXRNormConfig(method="none").validate()
    CXRNormConfig(clip_limit=np.float32(1.5), tile_grid=np.int64(4), median_kernel=1, low_pct=0, high_pct=100).validate()


# ---------------------------------------------------------------- batch + memo


def test_apply_batch_equals_one_by_one():
    imgs = stack(7)
    for cfg in (CXRNormConfig(), CXRNormConfig(method="histeq_blur"), CXRNormConfig(tile_grid=4, median_kernel=3)):
        expected = np.stack([apply(im, cfg) for im in imgs])
        for workers in (0, 1, 3):
            out = apply_batch(imgs, cfg, workers=workers)
            assert out is not imgs and out.dtype == np.uint8
            np.testing.assert_array_equal(out, expected)
    none_out = apply_batch(imgs, CXRNormConfig(method="none"))
    assert none_out is not imgs
    np.testing.assert_array_equal(none_out, imgs)
    assert apply_batch(imgs[:0], CXRNormConfig()).shape == (0, 64, 64)


@pytest.fixture
def counted(monkeypatch):
    calls = {"n": 0}
    real = METHODS.get("cxrnorm")

    def counting(img, cfg):
        calls["n"] += 1
        return real(img, cfg)

    monkeypatch.setitem(METHODS._items, "cxrnorm", counting)
    return calls


def test_normalized_lru_hit_does_not_recompute(counted):
    imgs = stack(4)
    cfg = CXRNormConfig()
    first = normalized(imgs, "src1", cfg, None)
    assert counted["n"] == 4
    second = normalized(imgs, "src1", cfg, None)
    assert counted["n"] == 4
    assert second is first
    assert not first.flags.writeable
    np.testing.assert_array_equal(first, apply_batch(imgs, cfg))
    # A disabled-step parameter change has the same key: still a hit.
    normalized(imgs, "src1", dataclasses.replace(cfg, clahe=True, stretch=True, low_pct=2.0), None)
    assert counted["n"] == 4 + 4  # apply_batch above ran the method 4 times
    # A different source key or config recomputes.
    normalized(imgs, "src2", cfg, None)
    assert counted["n"] == 12


def test_normalized_lru_is_bounded(counted):
    imgs = stack(1, size=16)
    for i in range(6):
        normalized(imgs, f"s{i}", CXRNormConfig(), None)
    assert len(cxrnorm._lru) <= 4
    n = counted["n"]
    normalized(imgs, "s0", CXRNormConfig(), None)  # evicted -> recomputed
    assert counted["n"] == n + 1


def test_memo_file_reused_after_lru_clear(tmp_path, counted):
    imgs = stack(4)
    cfg = CXRNormConfig(median_kernel=3)
    first = normalized(imgs, "fp", cfg, tmp_path)
    path = tmp_path / f"fp-{cfg.key()}.npy"
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    assert counted["n"] == 4
    clear_memo_cache()
    again = normalized(imgs, "fp", cfg, tmp_path)
    assert counted["n"] == 4
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(again, apply_batch(imgs, cfg))


def test_memo_files_stay_within_the_budget_least_recently_used_first(tmp_path, counted):
    imgs = stack(4)
    one = imgs.nbytes + 128  # a memo file: the array and its .npy header
    configs = [CXRNormConfig(median_kernel=3, clip_limit=c) for c in (1.0, 2.0, 3.0)]
    path = {c: memo_path(tmp_path, "fp", c) for c in configs}
    for c in configs[:2]:
        normalized(imgs, "fp", c, tmp_path, budget_bytes=3 * one)
    os.utime(path[configs[0]], (1, 1))  # used long ago...
    os.utime(path[configs[1]], (2, 2))
    clear_memo_cache()
    normalized(imgs, "fp", configs[0], tmp_path, budget_bytes=3 * one)  # ... and now again
    assert counted["n"] == 8  # a file hit: nothing recomputed
    normalized(imgs, "fp", configs[2], tmp_path, budget_bytes=2 * one)
    # two fit: the least recently used one (configs[1]) went, the one just used stayed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(path[c].name for c in (configs[0], configs[2]))
    normalized(imgs, "fp", configs[1], tmp_path, budget_bytes=0)  # 0: no memo files at all
    assert list(tmp_path.iterdir()) == [] and counted["n"] == 16


@pytest.mark.parametrize("corruption", ["truncate", "garbage", "wrong_shape", "wrong_dtype"])
def test_corrupt_memo_file_is_recomputed(tmp_path, counted, corruption):
    imgs = stack(3)
    cfg = CXRNormConfig()
    expected = apply_batch(imgs, cfg)
    counted["n"] = 0
    path = tmp_path / f"fp-{cfg.key()}.npy"
    if corruption == "truncate":
        np.save(path, expected)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "garbage":
        path.write_bytes(b"not a numpy file at all")
    elif corruption == "wrong_shape":
        np.save(path, expected[:2])
    else:
        np.save(path, expected.astype(np.uint16))
    out = normalized(imgs, "fp", cfg, tmp_path)
    assert counted["n"] == 3
    np.testing.assert_array_equal(out, expected)
    # The memo was rewritten and is good now.
    clear_memo_cache()
    np.testing.assert_array_equal(normalized(imgs, "fp", cfg, tmp_path), expected)
    assert counted["n"] == 3


def test_normalized_rejects_unsafe_source_key():
    with pytest.raises(ValueError, match="source_key"):
        normalized(stack(1, size=8), "../x", CXRNormConfig(), None)
