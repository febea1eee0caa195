"""A real cxrtune trial's training speed against the limit of its model, in one process.

The limit: the torchvision model alone, on synthetic tensors already on the device,
SGD train steps at the same batch size and precision (bf16 autocast + channels_last on
CUDA). The trial: ``engine.fit`` on the synthetic chest X-ray set at the same image size
(cache -> CXR-Norm -> ``--augment`` augmentation -> model), images/s of its fastest
training epoch after the first (the first pays cuDNN autotuning). Prints both and the
ratio per backbone. Goal on a GPU: >= 0.90 for resnet50, densenet121 and resnet18 at
224 px, batch 256.

    python bench/bench_gpu_trial.py resnet50 densenet121 resnet18            # on a GPU
    python bench/bench_gpu_trial.py resnet18 --size 32 --batch 16 --images 200 --epochs 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from cxrtune.config import TrialConfig, from_dict
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import _autocast, _uses_device_batches, fit, pick_device

log = logging.getLogger("bench_gpu_trial")


def limit(name: str, device: torch.device, size: int, batch: int, steps: int) -> float:
    """Images/s of the bare torchvision model on tensors already on ``device``."""
    model = torchvision.models.get_model(name, num_classes=3).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=device)
    model.train()

    def step() -> None:
        with _autocast(device, True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def trial(name: str, args: argparse.Namespace, home: Path) -> tuple[float, str]:
    """Images/s of a cxrtune training epoch (the fastest after the first), and the pipeline used."""
    cfg = from_dict(TrialConfig, {
        "data": {"source": "synthetic", "root": str(home / "synthetic"), "cache_dir": str(home / "cache"),
                 "image_size": args.size, "synthetic_n": args.images},
        "model": {"backbone": name, "weights": "none"},
        "preprocess": {"method": "cxrnorm"}, "augment": {"preset": args.augment},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "loop": {"epochs": args.epochs, "batch_size": args.batch, "input_pipeline": args.pipeline},
        "output_dir": str(home / "run")})
    data = prepare_data(cfg.data, progress=False)
    n_train = len(data.rows("train"))
    result = fit(cfg, data, workdir=home / f"run-{name}")
    epochs = result.history[1:] or result.history
    pipeline = "device" if _uses_device_batches(cfg, pick_device(cfg.loop.device)) else "dataloader"
    return n_train / min(h["time/train_s"] for h in epochs), pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbones", nargs="*", default=["resnet50", "densenet121", "resnet18"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=6000, help="synthetic images (about 70 %% train)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="train steps of the limit")
    p.add_argument("--augment", default="light")
    p.add_argument("--pipeline", default="auto", choices=["auto", "dataloader", "device"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    device = pick_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            bound = limit(name, device, args.size, args.batch, args.steps)
            ours, pipeline = trial(name, args, Path(tmp))
            log.info("%-12s limit %8.0f img/s   cxrtune trial (%s) %8.0f img/s   ratio %.2f", name, bound,
                     pipeline, ours, ours / bound)
            print(json.dumps({"bench": "gpu_trial", "backbone": name, "device": str(device), "size": args.size,
                              "batch": args.batch, "augment": args.augment, "pipeline": pipeline,
                              "limit_img_per_s": round(bound), "trial_img_per_s": round(ours),
                              "ratio": round(ours / bound, 3)}))


if __name__ == "__main__":
    main()
