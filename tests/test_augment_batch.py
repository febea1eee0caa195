from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cxrtune.data.augment import eval_transform, train_transform
from cxrtune.data.augment_batch import BatchAugment, normalize_batch_eval
from cxrtune.data.augment_config import PRESETS, AugmentConfig

MEAN, STD = 0.5, 0.25


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny per-image ops oversubscribe a shared 2-core machine (10-20x slower with 2 threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n: int = 8, size: int = 64, seed: int = 0, lo: int = 30, hi: int = 220) -> torch.Tensor:
    """(n, 1, size, size) uint8 'radiographs': a smooth pattern plus noise, asymmetric and within lo..hi."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 125 + 60 * np.sin(5 * xx + rng.uniform(0, 6, (n, 1, 1))) * np.cos(3 * yy + xx)
    base = base + rng.normal(0, 15, (n, size, size))
    return torch.from_numpy(np.clip(base, lo, hi).astype(np.uint8))[:, None]


def only(**op) -> AugmentConfig:
    return AugmentConfig(preset="none", **op)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x in 0..1, converted exactly as the augmentation converts it (x / 255 differs in the last bit)."""
    return normalize_batch_eval(x, 0.0, 1.0)


# ---- shape, dtype, fast path -------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("size", [64, 48])
def test_every_preset_gives_finite_normalised_float_batches(preset, size):
    x = images()
    out = BatchAugment(AugmentConfig(preset=preset), size, MEAN, STD)(x, 0)
    assert out.shape == (8, 1, size, size) and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()
    assert out.min() >= (0 - MEAN) / STD - 1e-5 and out.max() <= (1 - MEAN) / STD + 1e-5


def test_none_is_exactly_the_evaluation_normalisation():
    x = images()
    aug = BatchAugment(AugmentConfig(preset="none"), 64, MEAN, STD)
    assert not aug.active
    out = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, normalize_batch_eval(x, MEAN, STD))
    # bit-identical to the per-image torchvision evaluation transform
    assert torch.equal(out, torch.stack([eval_transform(MEAN, STD)(im) for im in x]))
    assert torch.equal(x, images())  # the input is left alone


def test_non_uint8_input_is_refused():
    with pytest.raises(TypeError, match="uint8"):
        BatchAugment(AugmentConfig(preset="medium"), 64, MEAN, STD)(unit(images()), 0)
    with pytest.raises(TypeError, match="seed"):
        BatchAugment(AugmentConfig(preset="medium"), 64, MEAN, STD)(images(), 1.5)


# ---- randomness and seeding ---------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["medium", "heavy"])
def test_each_sample_gets_its_own_parameters(preset):
    x = images(1).expand(8, -1, -1, -1).contiguous()
    out = BatchAugment(AugmentConfig(preset=preset), 64, MEAN, STD)(x, 3)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(out[i], out[j]), (i, j)


@pytest.mark.parametrize("preset", ["light", "heavy"])
def test_the_same_seed_gives_the_same_batch(preset):
    x, aug = images(), BatchAugment(AugmentConfig(preset=preset), 64, MEAN, STD)
    assert torch.equal(aug(x, 7), aug(x, 7))
    assert not torch.equal(aug(x, 7), aug(x, 8))
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    first = aug(x, g1)
    assert torch.equal(first, aug(x, g2))
    assert not torch.equal(first, aug(x, g1))  # the generator advanced: the next batch differs


def test_the_callers_global_rng_is_untouched():
    x, aug = images(), BatchAugment(AugmentConfig(preset="heavy"), 64, MEAN, STD)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(5)
    torch.set_rng_state(state)
    aug(x, 1)
    aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


# ---- each op alone ------------------------------------------------------------------------------

def test_perspective_alone_warps_about_half_the_samples():
    x = images(16)
    out = BatchAugment(only(perspective=0.3), 64, 0.0, 1.0)(x, 0)
    changed = [not torch.equal(o, u) for o, u in zip(out, unit(x))]
    assert 2 <= sum(changed) <= 14  # p = 0.5, as torchvision's
    assert out.min() >= 0 and out.max() <= 1


def test_rotation_alone_rotates_every_sample_with_nearest_neighbours():
    x = images()
    aug = BatchAugment(only(rotation=30.0), 64, 0.0, 1.0)
    out = aug(x, 0)
    angles = aug.ops[0]._params["degrees"]
    assert angles.abs().max() <= 30 and len(set(angles.tolist())) == 8
    for o, u, angle in zip(out, unit(x), angles):
        # below ~0.6 degrees no pixel of a 64-pixel image moves by half a pixel, and
        # nearest resampling leaves the image as it was
        if abs(float(angle)) > 1.0:
            assert not torch.equal(o, u)
        # nearest resampling, zero fill: no new grey levels
        assert set(o.unique().tolist()) <= set(u.unique().tolist()) | {0.0}


@pytest.mark.parametrize("op,dims", [("hflip", [-1]), ("vflip", [-2])])
def test_flip_alone_at_probability_one_is_the_flip(op, dims):
    x = images()
    out = BatchAugment(only(**{op: 1.0}), 64, MEAN, STD)(x, 0)
    assert torch.equal(out, normalize_batch_eval(x.flip(dims), MEAN, STD))


@pytest.mark.parametrize("op", [dict(crop_scale=0.5), dict(blur=1.0), dict(sharpness=1.0),
                                dict(brightness=0.5), dict(contrast=0.5), dict(autocontrast=1.0)])
def test_other_ops_alone_change_every_sample_and_stay_in_range(op):
    x = images()
    out = BatchAugment(only(**op), 64, 0.0, 1.0)(x, 0)
    assert out.min() >= 0 and out.max() <= 1
    for o, u in zip(out, unit(x)):
        assert not torch.equal(o, u)


def test_blur_smooths_and_sharpening_keeps_the_border():
    x = images()
    blurred = BatchAugment(only(blur=1.0), 64, 0.0, 1.0)(x, 0)
    sharp = BatchAugment(only(sharpness=1.0), 64, 0.0, 1.0)(x, 0)
    u = unit(x)
    assert (blurred.std((2, 3)) < u.std((2, 3))).all()
    assert (sharp.std((2, 3)) > u.std((2, 3))).all()
    # torchvision (and kornia) leave the 1-pixel border unsharpened
    assert torch.equal(sharp[..., 0, :], u[..., 0, :]) and torch.equal(sharp[..., :, -1], u[..., :, -1])


def test_autocontrast_stretches_each_image_and_leaves_a_flat_one_alone():
    x = images()
    x[3] = 77  # a constant image: torchvision keeps it (kornia's own op would make it black)
    out = BatchAugment(only(autocontrast=1.0), 64, 0.0, 1.0)(x, 0)
    for i in range(8):
        if i == 3:
            assert torch.equal(out[i], unit(x[i:i + 1])[0])
        else:
            assert out[i].min() == 0 and out[i].max() == 1


# ---- the same parameters give torchvision's output ---------------------------------------------

def _op(**op):
    aug = BatchAugment(only(**op), 32, 0.0, 1.0)
    assert len(aug.ops) == 1
    return aug.ops[0]


def test_perspective_draws_torchvision_corners_and_warps_like_torchvision():
    d, x = 0.3, unit(images(8, 32))
    op = _op(perspective=d)
    torch.manual_seed(0)
    params = op.forward_parameters(x.shape)
    out = op(x, params=params)
    bound, drawn = int(d * (32 // 2)), set()
    for i in range(8):
        start = (params["start_points"][i] + 0.5).round().int().tolist()
        end = (params["end_points"][i] + 0.5).round().int().tolist()
        assert start == [[0, 0], [31, 0], [31, 31], [0, 31]]
        offsets = (torch.tensor(end) - torch.tensor(start)).abs()
        drawn |= set(offsets.flatten().tolist())
        expected = TF.perspective(x[i], start, end, fill=0) if params["batch_prob"][i] else x[i]
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert drawn == set(range(bound + 1))  # torchvision's integer offsets 0..int(d * S // 2)


@pytest.mark.parametrize("op,reference", [
    (dict(rotation=20.0), lambda im, p: TF.rotate(im, float(p["degrees"]))),
    (dict(crop_scale=0.6), lambda im, p: TF.resized_crop(
        im, int(p["src"][0, 1]), int(p["src"][0, 0]), int(p["src"][2, 1] - p["src"][0, 1] + 1),
        int(p["src"][2, 0] - p["src"][0, 0] + 1), [32, 32], antialias=True)),
    (dict(blur=1.0), lambda im, p: TF.gaussian_blur(im, [3, 3], [float(p["sigma"])] * 2)),
    (dict(sharpness=1.0), lambda im, p: TF.adjust_sharpness(im, 2.0)),
])
def test_kornia_ops_match_torchvision_for_the_same_parameters(op, reference):
    x = unit(images(4, 32))
    module = _op(**op)
    torch.manual_seed(0)
    params = module.forward_parameters(x.shape)
    out = module(x, params=params)
    for i in range(4):
        p = {k: v[i] for k, v in params.items() if k not in ("forward_input_shape",)}
        torch.testing.assert_close(out[i], reference(x[i], p), atol=1e-5, rtol=0)


def test_color_jitter_matches_torchvision_in_either_order_per_sample():
    # uniform noise over the full range, so that the first step clips and the order shows
    x = unit(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 1, 32, 32), dtype=np.uint8)))
    module = _op(brightness=0.5, contrast=0.5)
    torch.manual_seed(0)
    out = module(x)
    torch.manual_seed(0)  # the same draws again, to read the factors
    params = module.first.forward_parameters(x.shape)
    orders = set()
    for i in range(16):
        b, c = float(params["brightness_factor"][i]), float(params["contrast_factor"][i])
        bc = TF.adjust_contrast(TF.adjust_brightness(x[i], b), c)
        cb = TF.adjust_brightness(TF.adjust_contrast(x[i], c), b)
        d_bc, d_cb = float((out[i] - bc).abs().max()), float((out[i] - cb).abs().max())
        assert min(d_bc, d_cb) < 1e-5
        if float((bc - cb).abs().max()) > 1e-3:
            orders.add("bc" if d_bc < d_cb else "cb")
    assert orders == {"bc", "cb"}  # the order is drawn per sample, not per batch


# ---- statistics against the per-image torchvision pipeline --------------------------------------

def _torchvision(cfg: AugmentConfig, x: torch.Tensor, seed: int) -> torch.Tensor:
    tf = train_transform(cfg, x.shape[-1], 0.0, 1.0)
    torch.manual_seed(seed)
    return torch.stack([tf(im) for im in x])


def test_flip_rate_matches_torchvision():
    x, cfg = images(1024, 8), only(hflip=0.5, vflip=0.3)
    ours = BatchAugment(cfg, 8, 0.0, 1.0)(x, 0)
    theirs = _torchvision(cfg, x, 0)
    u = unit(x)

    def rate(out, dims):
        return sum(torch.equal(o, f) for o, f in zip(out, u.flip(dims))) / len(x)

    for dims, p in (([-1], 0.5 * 0.7), ([-2], 0.3 * 0.5), ([-2, -1], 0.5 * 0.3)):
        assert abs(rate(ours, dims) - p) < 0.05 and abs(rate(ours, dims) - rate(theirs, dims)) < 0.06


def test_brightness_and_contrast_statistics_match_torchvision():
    x, cfg = images(512, 16), only(brightness=0.4, contrast=0.4)
    ours, theirs = BatchAugment(cfg, 16, 0.0, 1.0)(x, 0), _torchvision(cfg, x, 0)
    for out in (ours, theirs):
        assert abs(float(out.mean()) - float(unit(x).mean())) < 0.02  # E[factor] = 1
    # mean level, its spread (brightness) and the mean per-image contrast
    for stat in (lambda o: o.mean(), lambda o: o.mean((1, 2, 3)).std(), lambda o: o.std((2, 3)).mean()):
        a, b = float(stat(ours)), float(stat(theirs))
        assert abs(a - b) < 0.1 * abs(b) + 0.005, (a, b)


def test_heavy_preset_statistics_match_torchvision():
    x, cfg = images(128, 32), AugmentConfig(preset="heavy")
    ours, theirs = BatchAugment(cfg, 32, 0.0, 1.0)(x, 0), _torchvision(cfg, x, 0)
    for stat in (lambda o: o.mean(), lambda o: o.std((2, 3)).mean(), lambda o: (o == 0).float().mean()):
        a, b = float(stat(ours)), float(stat(theirs))
        assert abs(a - b) < 0.1 * abs(b) + 0.01, (a, b)
