"""What a trial's model costs to run: parameters, FLOPs and inference latency, measured in
the trial on its own device, so a search can weigh F1 against cost (``search.objectives``).

Measured once per trial, right after the model is built (the architecture fixes them),
and reported with every epoch as ``cost/...`` metrics, beside ``cost/train_s``, the
training time so far:

- ``cost/params_m``: parameters, in millions;
- ``cost/gflops``: FLOPs of one image's forward pass at the space's image size, in
  billions (``torch.utils.flop_counter``, which counts a multiply-add as two FLOPs);
- ``cost/latency_ms`` and ``cost/latency_b32_ms``: wall time of one eval-mode forward
  pass of a batch of 1 and of 32 images, as the trial evaluates (its channels, memory
  format and autocast), after ``WARMUP`` passes, the median of ``repeats``.

The model is left as it was found (its train/eval mode); no random number is drawn, so
measuring changes nothing of a seeded trial.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from .config import TrialConfig

__all__ = ["WARMUP", "LATENCY_BATCHES", "measure_costs"]

WARMUP = 2  # untimed passes first: allocator, cuDNN autotuning, lazy initialisation
LATENCY_BATCHES = {"cost/latency_ms": 1, "cost/latency_b32_ms": 32}


def _forward(model: nn.Module, cfg: TrialConfig, batch: int, size: int,
             device: torch.device) -> Callable[[], None]:
    """One evaluation forward pass of ``batch`` images, as validation runs it."""
    from .engine import eval_logits  # engine imports this module

    # zeros, not random numbers: the trial's RNG streams stay untouched
    x = torch.zeros(batch, 1, size, size, device=device)
    return lambda: eval_logits(model, x, device, cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    for _ in range(WARMUP):
        run()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _gflops(forward: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def measure_costs(model: nn.Module, cfg: TrialConfig, image_size: int, device: torch.device,
                  repeats: int) -> dict[str, float]:
    """The ``cost/...`` metrics of ``model`` (all but ``cost/train_s``, which the training
    loop adds), each latency the median of ``repeats`` timed passes."""
    was_training = model.training
    model.eval()
    try:
        costs = {"cost/params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                 "cost/gflops": _gflops(_forward(model, cfg, 1, image_size, device))}
        for name, batch in LATENCY_BATCHES.items():
            costs[name] = _median_ms(_forward(model, cfg, batch, image_size, device), device, repeats)
        return costs
    finally:
        model.train(was_training)
