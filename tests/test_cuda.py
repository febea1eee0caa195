"""The GPU paths, on a CUDA device (the whole module is skipped without one): images on
the GPU or, past the trial's share, in pinned host memory; seeded augmentation
bit-identical on the GPU and following the CPU's; a trial on the device pipeline
reproducible and exactly resumable with deterministic kernels. CXR-Norm on the GPU is
checked against the CPU in test_cxrnorm_torch.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cxrtune.data.augment_batch import BatchAugment
from cxrtune.data.augment_config import AugmentConfig
from cxrtune.data.device_batches import place_images
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import fit

from test_engine import _killed_then_resumed, small_cfg, weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def radiographs(n: int = 16, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 125 + 60 * np.sin(5 * xx + rng.uniform(0, 6, (n, 1, 1))) * np.cos(3 * yy + xx)
    return np.clip(base + rng.normal(0, 15, (n, size, size)), 0, 255).astype(np.uint8)


def test_images_go_to_the_gpu_when_they_fit_the_trials_share():
    images = radiographs()
    placed = place_images(images, CUDA, 0.25)
    assert placed.device.type == "cuda" and torch.equal(placed.cpu(), torch.from_numpy(images))


def test_images_past_the_trials_share_stay_in_pinned_host_memory_and_the_log_says_so(caplog):
    images = radiographs()
    with caplog.at_level(logging.WARNING, logger="cxrtune"):
        placed = place_images(images, CUDA, 1e-12)
    assert placed.device.type == "cpu" and placed.is_pinned()
    assert torch.equal(placed, torch.from_numpy(images))
    assert "do not fit" in caplog.text and "pinned host memory" in caplog.text


@pytest.mark.parametrize("preset", ["light", "heavy"])
def test_seeded_augmentation_on_the_gpu_is_bit_identical_and_draws_what_the_cpu_draws(preset):
    x = torch.from_numpy(radiographs())[:, None]
    aug = BatchAugment(AugmentConfig(preset=preset), 48, 0.5, 0.25)
    gpu = aug(x.to(CUDA), 7)
    assert gpu.device.type == "cuda" and torch.equal(gpu, aug(x.to(CUDA), 7))
    assert not torch.equal(gpu, aug(x.to(CUDA), 8))
    # the random parameters are drawn on the CPU either way: the GPU's batch is the CPU's
    # up to float rounding (a pixel on an interpolation edge may round the other way)
    diff = (gpu.cpu() - aug(x, 7)).abs()
    assert diff.mean() < 1e-3 and (diff > 1e-2).float().mean() < 0.01, (diff.mean(), diff.max())


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def test_a_deterministic_device_pipeline_trial_reruns_and_resumes_bit_for_bit(home, tmp_path):
    cfg = small_cfg(home, loop={"input_pipeline": "device", "device": "cuda", "deterministic": True},
                    sampler="oversample", augment={"preset": "heavy"}, preprocess={"method": "cxrnorm"})
    data = prepare_data(cfg.data, progress=False)
    straight, resumed = _killed_then_resumed(cfg, data, tmp_path)
    again = fit(cfg, data, workdir=tmp_path / "again")
    assert straight.history[-1]["train/loss"] == again.history[-1]["train/loss"]
    a, c = weights(tmp_path / "a" / "checkpoint"), weights(tmp_path / "c" / "checkpoint")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert straight.history[-1]["val/f1_macro"] == resumed.history[-1]["val/f1_macro"]
