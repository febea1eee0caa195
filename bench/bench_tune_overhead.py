"""Tune overhead: epoch time of the same trial inside a Ray Tune trial vs `cxrtune train`.

Both run the engine on the same prepared data and config; the figure is the wall
time between consecutive per-epoch reports (so Tune's checkpoint persistence and
result handling count against it), median over epochs 2..N. Target: <= 1.10x.

    python bench/bench_tune_overhead.py [--epochs 6] [--image-size 64] [--backbone convnet5]
    python bench/bench_tune_overhead.py --image-size 224 --backbone resnet50 --batch 256 --images 6000  # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import fit
from cxrtune.search import experiment_dir, run_search
from cxrtune.space import load_spec

log = logging.getLogger("bench_tune_overhead")


SPACE = """
name: overhead
data: {{source: synthetic, task: three_class, image_size: {size}, synthetic_n: {images}}}
fixed:
  model: {{backbone: {backbone}}}
  loop: {{epochs: {epochs}, batch_size: {batch}}}
space:
  sampler: {{choice: [oversample]}}
search: {{algorithm: grid, scheduler: {{name: fifo}}, max_concurrent: 1}}
# all of this machine for the one trial, as `cxrtune train` has (Ray sets OMP threads from it)
resources: {{cpu: {cpus}, gpu: {gpus}}}
tracking: {{uri: "sqlite:///{tmp}/mlflow.db", register_model: null}}
storage: {{path: {tmp}/ray}}
"""


def spec_for(args, tmp: Path):
    f = tmp / "overhead.yaml"
    f.write_text(SPACE.format(size=args.image_size, backbone=args.backbone, epochs=args.epochs, tmp=tmp,
                              images=args.images, batch=args.batch, cpus=os.cpu_count(), gpus=min(torch.cuda.device_count(), 1)))
    return load_spec(f)


def train_epoch_times(spec, data, tmp: Path) -> list[float]:
    stamps = [time.perf_counter()]
    cfg = spec.trial_config({"sampler": "oversample"})
    fit(cfg, data, lambda m, c: stamps.append(time.perf_counter()), workdir=tmp / "train")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def tune_epoch_times(spec) -> list[float]:
    from ray.tune import ExperimentAnalysis

    run_search(spec)
    df = ExperimentAnalysis(experiment_dir(spec)).trial_dataframes
    (trial_df,) = df.values()
    return trial_df["time_this_iter_s"].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--backbone", default="convnet5")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=600, help="synthetic images (about 70 %% train)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        spec = spec_for(args, Path(tmp))
        data = prepare_data(spec.data, progress=False)
        train_s = statistics.median(train_epoch_times(spec, data, Path(tmp))[1:])
        tune_s = statistics.median(tune_epoch_times(spec)[1:])
    ratio = tune_s / train_s
    log.info("epoch time: cxrtune train %.2f s, inside a Tune trial %.2f s: %.3fx (target <= 1.10x)",
             train_s, tune_s, ratio)
    print(json.dumps({"bench": "tune_overhead", "backbone": args.backbone, "image_size": args.image_size, "batch": args.batch,
                      "train_epoch_s": round(train_s, 3), "tune_epoch_s": round(tune_s, 3),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
