"""The torch CXR-Norm (cxrtune.data.cxrnorm_torch) against the OpenCV path (cxrtune.data.cxrnorm)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cxrtune.data import cxrnorm
from cxrtune.data.cxrnorm_config import METHODS, CXRNormConfig
from cxrtune.data.cxrnorm_torch import normalize_batch, percentiles
from cxrtune.data.synthetic import CLASSES, render_phantom
from cxrtune.errors import ConfigError

SIZE = 224
# The project's tolerance is MAD <= 2 and p99 <= 8 grey levels. The port is
# bit-exact on CPU (MAD 0, p99 0 over the whole grid); these leave one level of
# room for a last-bit float difference on another device.
MAD_TOL = 0.02
P99_TOL = 1.0

OFF = dict(clahe=False, median_kernel=1, stretch=False)
# (low_pct, high_pct): the default, the bundled cxrnorm space's extremes and an interior draw.
STRETCHES = [(2.0, 98.0), (0.0, 100.0), (5.0, 95.0), (4.3, 96.7)]


def phantom(i: int, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """A synthetic chest X-ray phantom with scanner variation, quantised as the 8-bit files are."""
    img = render_phantom(CLASSES[i % len(CLASSES)], seed=100 + i, shape=shape, scanner=True).image
    return np.round(img * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.stack([phantom(i) for i in range(4)])  # one per class


def cfg_of(clahe: bool = True, clip: float = 2.0, grid: int = 8, kernel: int = 5,
           pcts: tuple[float, float] | None = (2.0, 98.0)) -> CXRNormConfig:
    lo, hi = pcts if pcts is not None else (2.0, 98.0)
    return CXRNormConfig(clahe=clahe, clip_limit=clip, tile_grid=grid, median_kernel=kernel,
                         stretch=pcts is not None, low_pct=lo, high_pct=hi)


def parity_grid() -> list[CXRNormConfig]:
    cfgs = []
    # CLAHE x median in full; the stretch settings (and off) rotate through the combinations.
    stretches = itertools.cycle([None, *STRETCHES])
    for clip, grid, kernel in itertools.product((1.0, 2.0, 3.0, 4.0), (4, 8), (1, 3, 5)):
        cfgs.append(cfg_of(clip=clip, grid=grid, kernel=kernel, pcts=next(stretches)))
    # The bundled space's other values: a 16 x 16 grid and a 7 x 7 median.
    cfgs += [cfg_of(clip=2.5, grid=16, kernel=7), cfg_of(clip=1.0, grid=16, kernel=1, pcts=None)]
    # Without CLAHE: median and stretch alone and together.
    for kernel, pcts in itertools.product((1, 3, 5, 7), (None, *STRETCHES[:3])):
        if kernel > 1 or pcts is not None:
            cfgs.append(cfg_of(clahe=False, kernel=kernel, pcts=pcts))
    cfgs += [CXRNormConfig(method="histeq_blur"), CXRNormConfig(method="none"), CXRNormConfig(**OFF)]
    return cfgs


def diff_stats(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


# ---------------------------------------------------------------- parity with OpenCV


def test_matches_opencv_over_the_parameter_grid(images):
    batch = torch.from_numpy(images)
    worst: dict[str, tuple[float, float]] = {}
    failures = []
    for cfg in parity_grid():
        got = normalize_batch(batch, cfg).numpy()
        for i, img in enumerate(images):
            mad, p99 = diff_stats(got[i], cxrnorm.apply(img, cfg))
            w = worst.get(cfg.method, (0.0, 0.0))
            worst[cfg.method] = (max(w[0], mad), max(w[1], p99))
            if mad > MAD_TOL or p99 > P99_TOL:
                failures.append(f"{cfg.effective()} image {i}: MAD {mad:.3f}, p99 {p99:.1f}")
    assert not failures, "\n".join(failures)
    assert set(worst) == set(METHODS.names())


@pytest.mark.parametrize("cfg", [
    CXRNormConfig(),  # the reproduced paper's settings
    cfg_of(clip=1.0, grid=4, kernel=7, pcts=(0.0, 100.0)),
    cfg_of(clip=4.0, grid=16, kernel=3, pcts=(5.0, 95.0)),
    CXRNormConfig(method="histeq_blur"),
], ids=["default", "space-low", "space-high", "histeq_blur"])
def test_bit_exact_on_cpu(images, cfg):
    got = normalize_batch(torch.from_numpy(images), cfg).numpy()
    np.testing.assert_array_equal(got, cxrnorm.apply_batch(images, cfg))


@pytest.mark.parametrize("shape", [(200, 237), (237, 200), (250, 250)])
def test_non_square_and_indivisible_sizes_match_opencv(shape):
    # OpenCV pads both axes when either is not divisible by the tile grid.
    imgs = np.stack([phantom(i, shape) for i in range(2)])
    for cfg in (cfg_of(grid=8, kernel=5), cfg_of(clip=3.0, grid=7, kernel=1, pcts=(0.0, 100.0)),
                CXRNormConfig(method="histeq_blur")):
        got = normalize_batch(torch.from_numpy(imgs), cfg).numpy()
        np.testing.assert_array_equal(got, cxrnorm.apply_batch(imgs, cfg), err_msg=str(cfg.effective()))


@pytest.mark.parametrize("size,grid", [(8, 8), (8, 16), (5, 8), (2, 4), (1, 8)])
def test_tiny_images_match_opencv(size, grid):
    # Images no larger than the tile grid are legal in OpenCV (kornia's CLAHE refuses them).
    rng = np.random.default_rng(size * 100 + grid)
    imgs = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    imgs[1] = 77  # flat: the stretch must leave it alone
    for cfg in (cfg_of(grid=grid, kernel=3), cfg_of(clip=1.0, grid=grid, kernel=7, pcts=(0.0, 100.0)),
                CXRNormConfig(method="histeq_blur")):
        got = normalize_batch(torch.from_numpy(imgs), cfg).numpy()
        np.testing.assert_array_equal(got, cxrnorm.apply_batch(imgs, cfg), err_msg=str(cfg.effective()))


@pytest.mark.parametrize("kernel", [9, 15])
def test_large_median_kernels_match_opencv(kernel):
    imgs = np.stack([phantom(i, (48, 40)) for i in range(2)])
    cfg = cfg_of(clahe=False, kernel=kernel, pcts=None)
    np.testing.assert_array_equal(normalize_batch(torch.from_numpy(imgs), cfg).numpy(),
                                  cxrnorm.apply_batch(imgs, cfg))


def test_percentiles_match_opencv_path(images):
    flat = np.full((SIZE, SIZE), 9, dtype=np.uint8)
    stack = np.concatenate([images, flat[None]])
    pcts = (0.0, 2.0, 4.3, 50.0, 96.7, 100.0)
    got = percentiles(torch.from_numpy(stack), pcts).numpy()
    want = np.stack([cxrnorm.percentiles(img, pcts) for img in stack])
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- batching, shapes, devices


def test_chunking_and_batching_do_not_change_values(images):
    cfg = cfg_of(clip=3.0, grid=4, kernel=5)
    batch = torch.from_numpy(images)
    whole = normalize_batch(batch, cfg)
    for chunk in (1, 3, len(images) + 5):
        assert torch.equal(normalize_batch(batch, cfg, chunk=chunk), whole), chunk
    one_by_one = torch.cat([normalize_batch(batch[i : i + 1], cfg) for i in range(len(images))])
    assert torch.equal(one_by_one, whole)


@pytest.mark.parametrize("channel_axis", [False, True])
def test_shape_dtype_and_device_are_preserved(images, channel_axis):
    batch = torch.from_numpy(images[:2])
    if channel_axis:
        batch = batch.unsqueeze(1)
    for cfg in (CXRNormConfig(), CXRNormConfig(method="histeq_blur"), CXRNormConfig(method="none")):
        out = normalize_batch(batch, cfg)
        assert out.shape == batch.shape and out.dtype == torch.uint8 and out.device == batch.device
        assert out.data_ptr() != batch.data_ptr()  # a new tensor, even for the identity
        assert torch.equal(out.reshape(2, SIZE, SIZE), normalize_batch(torch.from_numpy(images[:2]), cfg))


def test_deterministic_and_input_untouched(images):
    batch = torch.from_numpy(images.copy())
    before = batch.clone()
    for cfg in (cfg_of(clip=2.7, grid=8, kernel=7, pcts=(4.3, 96.7)), CXRNormConfig(method="histeq_blur")):
        first = normalize_batch(batch, cfg, chunk=3)
        assert torch.equal(normalize_batch(batch, cfg, chunk=3), first)
    assert torch.equal(batch, before)


def test_empty_batch():
    empty = torch.empty((0, SIZE, SIZE), dtype=torch.uint8)
    out = normalize_batch(empty, CXRNormConfig())
    assert out.shape == empty.shape and out.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu(images):
    for cfg in (CXRNormConfig(), cfg_of(clip=4.0, grid=16, kernel=3, pcts=(0.0, 100.0)),
                cfg_of(clip=1.0, grid=4, kernel=7), CXRNormConfig(method="histeq_blur")):
        gpu = normalize_batch(torch.from_numpy(images).cuda(), cfg, chunk=3)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), normalize_batch(torch.from_numpy(images), cfg)), cfg.effective()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [
    torch.zeros((2, 8, 8), dtype=torch.float32),
    torch.zeros((8, 8), dtype=torch.uint8),
    torch.zeros((2, 3, 8, 8), dtype=torch.uint8),
    np.zeros((2, 8, 8), dtype=np.uint8),
], ids=["float", "2-D", "3-channel", "numpy"])
def test_bad_batch_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="CXR-Norm expects|expects a torch.Tensor"):
        normalize_batch(bad, CXRNormConfig())


def test_bad_cache_chunk_and_config_are_clear_errors(images):
    with pytest.raises(ValueError, match="chunk must be"):
        normalize_batch(torch.from_numpy(images), CXRNormConfig(), chunk=0)
    with pytest.raises(ConfigError, match="median_kernel"):
        normalize_batch(torch.from_numpy(images), CXRNormConfig(median_kernel=4))
