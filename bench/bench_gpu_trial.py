"""A real cxrtune trial's training speed against the limit of its model, in one process.

The limit: the torchvision model alone, on synthetic tensors already on the device,
SGD train steps at the same batch size and precision (bf16 autocast + channels_last on
CUDA). The trial: ``engine.fit`` on the synthetic chest X-ray set at the same image size
(cache -> CXR-Norm -> ``--augment`` augmentation -> model), images/s of its fastest
training epoch after the first (the first pays cuDNN autotuning). Prints both and the
ratio per backbone. Goal on a GPU: >= 0.90 for resnet50, densenet121 and resnet18 at
224 px, batch 256.

With ``--trials N`` the trial runs N times at once on one GPU, as a search runs them:
a real Tune search whose trials each reserve 1/N of the GPU; the figure is the sum of
the trials' images/s (each its median training epoch after the first) against the limit
of one model alone. ``--set loop.deterministic=true`` (any trial-config key) measures
what a setting costs.

    python bench/bench_gpu_trial.py resnet50 densenet121 resnet18            # on a GPU
    python bench/bench_gpu_trial.py resnet18 --trials 4                      # four trials sharing it
    python bench/bench_gpu_trial.py resnet18 --size 32 --batch 16 --images 200 --epochs 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import yaml

from cxrtune.config import LoopConfig, TrialConfig, apply_overrides, from_dict
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import _autocast, _uses_device_batches, fit, pick_device

log = logging.getLogger("bench_gpu_trial")


def limit(name: str, loop: LoopConfig, size: int, device: torch.device, steps: int) -> float:
    """Images/s of the bare torchvision model on tensors already on ``device``, with the
    trial's batch size, precision, memory format and compilation."""
    batch = loop.batch_size
    model = torchvision.models.get_model(name, num_classes=3).to(device)
    channels_last = device.type == "cuda" and loop.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if loop.compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=device)
    model.train()

    def step() -> None:
        with _autocast(device, loop.amp):
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


def settings(name: str, args: argparse.Namespace, home: Path) -> dict:
    """The trial's config (as a dict): the synthetic set, CXR-Norm, ``--augment``, SGD."""
    return apply_overrides({
        "data": {"source": "synthetic", "root": str(home / "synthetic"), "cache_dir": str(home / "cache"),
                 "image_size": args.size, "synthetic_n": args.images},
        "model": {"backbone": name, "weights": "none"},
        "preprocess": {"method": "cxrnorm"}, "augment": {"preset": args.augment},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "loop": {"epochs": args.epochs, "batch_size": args.batch, "input_pipeline": args.pipeline},
        "output_dir": str(home / "run")}, args.set)


def trial(name: str, args: argparse.Namespace, home: Path) -> tuple[float, str]:
    """Images/s of a cxrtune training epoch (the fastest after the first), and the pipeline used."""
    cfg = from_dict(TrialConfig, settings(name, args, home))
    data = prepare_data(cfg.data, progress=False)
    n_train = len(data.rows("train"))
    result = fit(cfg, data, workdir=home / f"run-{name}")
    epochs = result.history[1:] or result.history
    pipeline = "device" if _uses_device_batches(cfg, pick_device(cfg.loop.device)) else "dataloader"
    return n_train / min(h["time/train_s"] for h in epochs), pipeline


def shared(name: str, args: argparse.Namespace, home: Path) -> tuple[float, str]:
    """Images/s of ``args.trials`` trials sharing the GPU in one Tune search, together."""
    from ray.tune import ExperimentAnalysis

    from cxrtune.search import experiment_dir, run_search
    from cxrtune.space import load_spec

    fixed = settings(name, args, home)
    data = fixed.pop("data")
    del fixed["output_dir"]
    space = {"name": "gpu_share", "data": data, "fixed": fixed,
             "space": {"loop.seed": {"choice": list(range(args.trials))}},
             "search": {"algorithm": "grid", "scheduler": {"name": "fifo"}, "max_concurrent": args.trials},
             "resources": {"cpu": 1, "gpu": round(1 / args.trials, 4) if torch.cuda.is_available() else 0},
             "tracking": {"uri": f"sqlite:///{home}/mlflow.db", "register_model": None},
             "storage": {"path": str(home / "ray")}}
    (home / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    spec = load_spec(home / "space.yaml")
    n_train = len(prepare_data(spec.data, progress=False).rows("train"))
    run_search(spec)
    frames = ExperimentAnalysis(experiment_dir(spec)).trial_dataframes.values()
    _check_overlap([(f["timestamp"].iloc[1], f["timestamp"].iloc[-1]) for f in frames])
    rates = [n_train / statistics.median(f["time/train_s"].iloc[1:]) for f in frames]
    log.info("%d trials at %s GPU each: %s img/s", len(rates), space["resources"]["gpu"],
             " + ".join(f"{r:.0f}" for r in rates))
    return sum(rates), f"{args.trials} trials"


def _check_overlap(windows: list[tuple[float, float]]) -> None:
    """The trials' measured epochs must have run at the same time, or their sum means nothing."""
    if max(start for start, _ in windows) >= min(end for _, end in windows):
        raise SystemExit(f"the trials did not run at the same time (epoch windows {windows}): "
                         "use more --epochs")


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
    p.add_argument("--trials", type=int, default=1, help="trials sharing the GPU in one Tune search")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trial-config setting, e.g. loop.deterministic=true (repeatable)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("cxrtune.data.device_batches").setLevel(logging.INFO)  # where the images went, CXR-Norm's time
    device = pick_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            loop = from_dict(TrialConfig, settings(name, args, Path(tmp))).loop
            bound = limit(name, loop, args.size, device, args.steps)
            ours, pipeline = (shared if args.trials > 1 else trial)(name, args, Path(tmp))
            log.info("%-12s limit %8.0f img/s   cxrtune trial (%s) %8.0f img/s   ratio %.2f", name, bound,
                     pipeline, ours, ours / bound)
            print(json.dumps({"bench": "gpu_trial", "backbone": name, "device": str(device), "size": args.size,
                              "batch": args.batch, "augment": args.augment, "pipeline": pipeline,
                              "trials": args.trials, "set": args.set,
                              "limit_img_per_s": round(bound), "trial_img_per_s": round(ours),
                              "ratio": round(ours / bound, 3)}))


if __name__ == "__main__":
    main()
