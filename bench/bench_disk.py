"""Disk a search writes per trial: cxrtune's retention against keeping everything.

The bundled ``cxrnorm`` space, shrunk to run on a CPU (synthetic images at 32 px, small
backbones, 6 epochs, ASHA from epoch 2), searched twice with N and 2N trials, each way:

- cxrtune: each trial keeps its best and its latest checkpoint (``storage.keep_checkpoints: 1``);
  CXR-Norm memos (CPU trials; a GPU trial computes CXR-Norm on the GPU and writes none)
  within ``data.memo_budget_gb``, least recently used evicted; here a budget of three memos.
- baseline: every epoch's checkpoint kept and every trial's CXR-Norm copy kept (no budget).

Prints the bytes of each kind per added trial (the difference between the two searches
over N) and the ratio baseline / cxrtune. Goal: per added trial, two checkpoints and
nothing else that grows.

    python bench/bench_disk.py [--trials 4] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from cxrtune.search import run_search
from cxrtune.space import load_spec

log = logging.getLogger("bench_disk")
SIZE, IMAGES = 32, 200


def overrides(tmp: Path, trials: int, epochs: int, baseline: bool) -> list[str]:
    memo_budget = 1e6 if baseline else 3 * IMAGES * SIZE * SIZE / 1e9  # GB: three memos' worth
    return [
        "data.source=synthetic", f"data.root={tmp}/synthetic", f"data.cache_dir={tmp}/cache",
        f"data.image_size={SIZE}", f"data.synthetic_n={IMAGES}", f"data.memo_budget_gb={memo_budget}",
        "fixed.model.weights=none", "fixed.loop.num_workers=0", f"fixed.loop.epochs={epochs}",
        "space.model.backbone={choice: [convnet5, simple_cnn]}",
        "search.scheduler={name: asha, grace_period: 2, reduction_factor: 2}",
        f"search.num_samples={trials}", "search.max_concurrent=2", "resources={cpu: 1, gpu: 0}",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.register_model=null",
        f"storage.path={tmp}/ray", f"storage.keep_checkpoints={epochs if baseline else 1}"]


def written(tmp: Path, trials: int, epochs: int, baseline: bool) -> dict[str, int]:
    """Bytes of each kind after one search of ``trials`` trials in a fresh folder."""
    summary = run_search(load_spec("cxrnorm", overrides(tmp, trials, epochs, baseline)))
    memos = _bytes(tmp / "cache" / "cxrnorm")
    return {"checkpoints": summary["disk_bytes"]["checkpoints"],
            "n_checkpoints": summary["n_checkpoints"],
            "results_other": summary["disk_bytes"]["results"] - summary["disk_bytes"]["checkpoints"],
            "cxrnorm_memos": memos, "image_cache": _bytes(tmp / "cache") - memos,
            "mlflow": _bytes(tmp / "mlruns") + _bytes(tmp / "mlflow.db") + _bytes(tmp / "mlartifacts")}


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def per_added_trial(trials: int, epochs: int, baseline: bool) -> dict[str, float]:
    runs = []
    for n in (trials, 2 * trials):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(written(Path(tmp), n, epochs, baseline))
    return {k: (runs[1][k] - runs[0][k]) / trials for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    ours, base = (per_added_trial(args.trials, args.epochs, b) for b in (False, True))
    for kind in ours:
        log.info("per added trial %-14s cxrtune %10.0f   baseline %10.0f", kind, ours[kind], base[kind])
    grows = lambda d: sum(v for k, v in d.items() if k != "n_checkpoints")  # noqa: E731
    ratio = grows(base) / max(grows(ours), 1)
    log.info("bytes per added trial: cxrtune %.0f, baseline %.0f: the baseline writes %.2fx", grows(ours),
             grows(base), ratio)
    print(json.dumps({"bench": "disk", "trials": args.trials, "epochs": args.epochs,
                      "cxrtune_per_trial": {k: round(v) for k, v in ours.items()},
                      "baseline_per_trial": {k: round(v) for k, v in base.items()}, "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
