"""The device input pipeline's batching (data/device_batches.py), on CPU tensors: the same
epoch order as the DataLoader path, every image once per evaluation pass, a seed per
(epoch, batch), and the images placed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from cxrtune.data.device_batches import IndexBatches, place_images
from cxrtune.data.samplers import SAMPLERS
from cxrtune.engine import EpochSampler, SeededItems, derived_seed

N, S, SEED = 50, 8, 3


@pytest.fixture
def images():
    # every image holds its own index, so a batch shows which images it gathered
    return np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None], (N, S, S)).copy()


def _first_pixel(x: torch.Tensor, seed: int) -> torch.Tensor:
    return x[:, :, 0, 0].float()


def _sampler(name: str, targets: np.ndarray) -> EpochSampler:
    generator = torch.Generator()
    inner = SAMPLERS.get(name)(targets, generator) or RandomSampler(range(len(targets)), generator=generator)
    return EpochSampler(inner, generator, SEED)


@pytest.mark.parametrize("name", ["shuffle", "oversample", "undersample"])
def test_an_epoch_draws_the_images_the_dataloader_path_draws(images, name):
    rows = np.arange(5, N)  # the training rows: a subset of the cache
    targets = rows % 3
    device_batches = IndexBatches(torch.from_numpy(images), rows, targets, 8, _first_pixel, torch.device("cpu"),
                                  sampler=_sampler(name, targets), drop_last=True)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return int(rows[i]), int(targets[i])

    sampler = _sampler(name, targets)
    loader = DataLoader(SeededItems(Rows(), SEED), batch_size=8, sampler=sampler, drop_last=True)
    for epoch in (1, 2):
        device_batches.sampler.set_epoch(epoch)
        sampler.set_epoch(epoch)
        got = [(x.squeeze(1).long().tolist(), y.tolist()) for x, y in device_batches]
        want = [(xs.tolist(), ys.tolist()) for xs, ys in loader]
        assert got == want and len(got) == len(device_batches)


def test_evaluation_passes_every_row_once_in_order_with_a_last_short_batch(images):
    rows = np.arange(N)[::-1].copy()
    batches = IndexBatches(torch.from_numpy(images), rows, rows % 2, 16, _first_pixel, torch.device("cpu"))
    seen = [x.squeeze(1).long() for x, _ in batches]
    assert [len(b) for b in seen] == [16, 16, 16, 2] and len(batches) == 4
    assert torch.cat(seen).tolist() == rows.tolist()


def test_each_batch_gets_the_seed_of_its_epoch_and_position(images):
    seeds = []

    def record(x, seed):
        seeds.append(seed)
        return x.float()

    rows = np.arange(N)
    batches = IndexBatches(torch.from_numpy(images), rows, rows % 2, 10, record, torch.device("cpu"),
                           sampler=_sampler("shuffle", rows % 2), batch_seed=lambda e, b: derived_seed(SEED, e, b))
    batches.sampler.set_epoch(4)
    x, y = next(iter(batches))
    assert x.shape == (10, 1, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
    list(batches)
    assert seeds[1:] == [derived_seed(SEED, 4, b) for b in range(5)] and len(set(seeds[1:])) == 5


def test_placing_images_on_the_cpu_copies_them_out_of_a_read_only_map(images, tmp_path):
    np.save(tmp_path / "c.npy", images)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    placed = place_images(mapped, torch.device("cpu"))
    assert placed.dtype == torch.uint8 and placed.shape == (N, S, S)
    assert torch.equal(placed, torch.from_numpy(images))


def test_rows_and_targets_must_pair_up(images):
    with pytest.raises(ValueError, match="rows but"):
        IndexBatches(torch.from_numpy(images), np.arange(3), np.arange(4), 2, _first_pixel, torch.device("cpu"))


def test_cxrnorm_in_place_chunk_by_chunk_equals_the_whole_batch_at_once():
    from cxrtune.data.cxrnorm_config import CXRNormConfig
    from cxrtune.data.cxrnorm_torch import normalize_batch
    from cxrtune.data.device_batches import normalize_placed

    rng = np.random.default_rng(0)
    raw = torch.from_numpy(rng.integers(0, 256, (10, 32, 32), dtype=np.uint8))
    cfg = CXRNormConfig(clip_limit=2.5, median_kernel=3)
    want = normalize_batch(raw.clone(), cfg)
    placed = raw.clone()
    assert normalize_placed(placed, cfg, torch.device("cpu"), chunk=3) is placed
    assert torch.equal(placed, want) and not torch.equal(placed, raw)
    identity = raw.clone()
    assert torch.equal(normalize_placed(identity, CXRNormConfig(method="none"), torch.device("cpu")), raw)
