"""The cost metrics a trial can measure (cost.py), without torch: the space's checks and
`cxrtune validate` read these names."""

from __future__ import annotations

from .registry import Registry

__all__ = ["COST_METRICS", "TRAIN_S", "cost_metric"]

TRAIN_S = "cost/train_s"

# metric -> what it means; every cost is lower-is-better (selection.direction: "cost/")
COST_METRICS: Registry[str] = Registry("cost metric")
COST_METRICS.add("cost/params_m", "parameters of the model, in millions")
COST_METRICS.add("cost/gflops", "FLOPs of one image's forward pass at the image size, in billions")
COST_METRICS.add("cost/latency_ms", "median eval forward time of a batch of 1 on the trial's device, ms")
COST_METRICS.add("cost/latency_b32_ms", "median eval forward time of a batch of 32 on the trial's device, ms")
COST_METRICS.add(TRAIN_S, "training time so far (the sum of the epochs' train time), s")


def cost_metric(name: str) -> bool:
    return name in COST_METRICS
