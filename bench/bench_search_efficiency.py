"""Search efficiency on the synthetic benchmark: TPE + ASHA vs grid and random search.

The same choice-only space (so grid can cover it) and the same number of trials for
each; the figure is the number of trial-epochs each search spends, in the order its
reports arrived, before some trial first reaches grid search's best validation
metric. Target: TPE + ASHA needs at most 1/4 of grid's trial-epochs.

    python bench/bench_search_efficiency.py [--epochs 6] [--image-size 48]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import pandas as pd

from cxrtune.search import experiment_dir, run_search
from cxrtune.space import load_spec

log = logging.getLogger("bench_search_efficiency")

SPACE = """
name: {name}
data: {{source: synthetic, task: three_class, image_size: {size}}}
fixed:
  model: {{backbone: convnet5}}
  loop: {{epochs: {epochs}, batch_size: 32}}
space:
  optimizer.lr: {{choice: [0.0003, 0.001, 0.003]}}
  preprocess.method: {{choice: [none, cxrnorm]}}
  sampler: {{choice: [shuffle, oversample]}}
  loss.name: {{choice: [cross_entropy, focal]}}
search:
  algorithm: {algorithm}
  scheduler: {scheduler}
  num_samples: {n}
  max_concurrent: 2
  seed: 0
tracking: {{uri: "sqlite:///{tmp}/mlflow.db", register_model: null}}
storage: {{path: {tmp}/ray}}
"""

def searches(grace: int, reduction: int) -> dict[str, tuple[str, str]]:
    """name -> (algorithm, scheduler)"""
    asha = f"{{name: asha, grace_period: {grace}, reduction_factor: {reduction}}}"
    return {"grid": ("grid", "{name: fifo}"), "random": ("random", "{name: fifo}"),
            "tpe_asha": ("optuna_tpe", asha)}


def reports(spec) -> pd.DataFrame:
    """Every per-epoch report of the search, in the order they arrived."""
    from ray.tune import ExperimentAnalysis

    frames = ExperimentAnalysis(experiment_dir(spec)).trial_dataframes.values()
    df = pd.concat([f[["timestamp", "time_total_s", "epoch", spec.metric]] for f in frames if len(f)])
    return df.sort_values(["timestamp", "time_total_s"]).reset_index(drop=True)


def epochs_to_reach(df: pd.DataFrame, metric: str, target: float) -> int | None:
    hit = df.index[df[metric] >= target - 1e-12]
    return int(hit[0]) + 1 if len(hit) else None  # each row is one trial-epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (epochs)")
    p.add_argument("--reduction", type=int, default=2, help="ASHA reduction factor")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    n = 3 * 2 * 2 * 2
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (algorithm, scheduler) in searches(args.grace, args.reduction).items():
            f = Path(tmp) / f"{name}.yaml"
            f.write_text(SPACE.format(name=name, size=args.image_size, epochs=args.epochs, algorithm=algorithm,
                                      scheduler=scheduler, n=n, tmp=tmp))
            spec = load_spec(f)
            run_search(spec)
            runs[name] = (spec, reports(spec))
    metric = runs["grid"][0].metric
    target = float(runs["grid"][1][metric].max())
    grid_epochs = epochs_to_reach(runs["grid"][1], metric, target)
    result = {"bench": "search_efficiency", "metric": metric, "grid_best": round(target, 4), "trials": n,
              "asha": {"grace_period": args.grace, "reduction_factor": args.reduction}}
    log.info("target: grid's best %s = %.4f (%d trials x %d epochs)", metric, target, n, args.epochs)
    for name, (spec, df) in runs.items():
        need = epochs_to_reach(df, metric, target)
        result[name] = {"total_trial_epochs": len(df), "best": round(float(df[metric].max()), 4),
                        "trial_epochs_to_grid_best": need,
                        "ratio_vs_grid": round(need / grid_epochs, 3) if need else None}
        log.info("%-9s %4d trial-epochs in all, best %.4f, reached grid's best after %s (%s of grid's)",
                 name, len(df), df[metric].max(), need if need else "never",
                 f"{need / grid_epochs:.2f}x" if need else "-")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
