"""Training-step throughput (images/s) per backbone on the current device.

Runs cxrtune's train step (engine: autocast bf16 + channels_last on CUDA, SAM when
asked) on synthetic tensors, and as the baseline the same model in plain fp32
with the default memory format, one run; prints a table and the ratio.

    python bench/bench_train_throughput.py --size 64 --batch 32 resnet18 densenet121
    python bench/bench_train_throughput.py --size 224 --batch 256 resnet50 densenet121   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import torch

from cxrtune.config import LoopConfig, TrialConfig
from cxrtune.engine import Setup, _loss, _to_device, pick_device
from cxrtune.losses import build_loss
from cxrtune.models import ModelConfig, build_model
from cxrtune.optim import build_optimizer

log = logging.getLogger("bench_train_throughput")


def images_per_s(cfg: TrialConfig, device: torch.device, size: int, batch: int, steps: int) -> float:
    model = build_model(cfg.model, 3, size).to(device)
    if device.type == "cuda" and cfg.loop.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.loop.compile else model
    opt = build_optimizer(cfg.optimizer, model.parameters())
    s = Setup(model, forward, build_loss(cfg.loss, [1, 1, 1]).to(device), opt, None, None, None, None,
              device, (0.0, 1.0))
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 3, (batch,))
    model.train()

    def step() -> None:
        xb, yb = _to_device(x, y, device, cfg)
        _loss(s, cfg, xb, yb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (cudnn autotune, compile)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbones", nargs="*", default=["simple_cnn", "convnet5", "resnet18", "densenet121"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = pick_device("auto")
    fast = LoopConfig(amp=True, channels_last=True, compile=args.compile)
    plain = LoopConfig(amp=False, channels_last=False, compile=False)
    log.info("%-20s %12s %12s %7s", "backbone", "cxrtune", "fp32 plain", "ratio")
    for name in args.backbones:
        cfg = TrialConfig(model=ModelConfig(backbone=name, in_channels=1))
        ours = images_per_s(dataclasses.replace(cfg, loop=fast), device, args.size, args.batch, args.steps)
        base = images_per_s(dataclasses.replace(cfg, loop=plain), device, args.size, args.batch, args.steps)
        log.info("%-20s %12.1f %12.1f %6.2fx", name, ours, base, ours / base)
        print(json.dumps({"bench": "train_throughput", "backbone": name, "device": str(device),
                          "size": args.size, "batch": args.batch, "img_per_s": round(ours, 1),
                          "baseline_img_per_s": round(base, 1), "ratio": round(ours / base, 2)}))


if __name__ == "__main__":
    main()
