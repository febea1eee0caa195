"""How long the report of a 100-trial search takes on this machine's CPU: cxrtune's
sampled explanations against explaining the whole test split.

A real checkpoint (``--backbone`` trained briefly on the synthetic set at ``--size``)
is scored on the test split as a search scores its best trial; 100 trials are sampled
from the ``demo`` space with made-up learning curves (the search figures cost by the
number of trials, not by what they learned). Then ``report.build.write_report`` runs
twice: as cxrtune runs it (Grad-CAM, occlusion and the shortcut check on a fixed
sample per class, t-SNE on up to 300 images per split) and with the samples as large as
the splits. Goal: cxrtune's under a minute.

    python bench/bench_report.py [--trials 100] [--backbone resnet18] [--size 224] [--images 600]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from cxrtune.config import TrialConfig, from_dict
from cxrtune.data.pipeline import prepare_data
from cxrtune.engine import evaluate_checkpoint, fit
from cxrtune.report import build
from cxrtune.space import load_spec
from cxrtune.space.sampling import define_by_run

log = logging.getLogger("bench_report")


def made_up_trials(spec, n: int, seed: int = 0) -> list[build.ReportTrial]:
    """``n`` points of the space, each with a noisy rising learning curve cut at an ASHA rung."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = []
    for i in range(n):
        trial = study.ask()
        define_by_run(spec)(trial)
        epochs = int(rng.choice([1, 2, 4, spec.max_epochs]))
        f1 = np.clip(np.cumsum(rng.uniform(0, 0.2, epochs)) + rng.normal(0, 0.02, epochs), 0, 1)
        history = [{"epoch": e + 1, "train/loss": 1.2 - 0.1 * e, "val/loss": 1.1 - 0.08 * e, spec.metric: float(f)}
                   for e, f in enumerate(f1)]
        best = int(np.argmax(f1))
        trials.append(build.ReportTrial(f"bench_{i:05d}", "completed" if epochs == spec.max_epochs else
                                        "stopped_early", epochs, float(f1[best]), best + 1, dict(trial.params),
                                        history=history))
    return sorted(trials, key=lambda t: -t.best)


def evaluation(args, home: Path):
    cfg = from_dict(TrialConfig, {
        "data": {"source": "synthetic", "root": str(home / "synthetic"), "cache_dir": str(home / "cache"),
                 "image_size": args.size, "synthetic_n": args.images},
        "model": {"backbone": args.backbone, "weights": "none"}, "preprocess": {"method": "cxrnorm"},
        "loop": {"epochs": 1, "batch_size": 32, "max_train_batches": 4}, "output_dir": str(home / "run")})
    data = prepare_data(cfg.data, progress=False)
    fit(cfg, data, workdir=home / "run")
    return data, evaluate_checkpoint(home / "run" / "checkpoint", data, "test")


def timed_report(out: Path, spec, data, trials, ev) -> float:
    start = time.perf_counter()
    build.write_report(out, spec, data, trials, ev, f"sqlite:///{out.parent}/optuna.db")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=600)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("cxrtune.report").setLevel(logging.INFO)  # each part's time
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        spec = load_spec("demo")
        data, ev = evaluation(args, home)
        trials = made_up_trials(spec, args.trials)
        ours = timed_report(home / "ours" / "report", spec, data, trials, ev)
        whole = len(data.split)
        for name in ("OVERLAY_PER_CLASS", "OCCLUSION_PER_CLASS", "SHORTCUT_PER_CLASS", "TSNE_PER_SPLIT"):
            setattr(build, name, whole)  # the baseline: every image, not a sample
        baseline = timed_report(home / "whole" / "report", spec, data, trials, ev)
    log.info("report of %d trials, %s at %d px, %d test images: cxrtune %.1f s, whole test split %.1f s "
             "(%.1fx)", args.trials, args.backbone, args.size, len(ev.y_true), ours, baseline, baseline / ours)
    print(json.dumps({"bench": "report", "trials": args.trials, "backbone": args.backbone, "size": args.size,
                      "test_images": len(ev.y_true), "cxrtune_s": round(ours, 1), "whole_split_s": round(baseline, 1),
                      "ratio": round(baseline / ours, 2)}))


if __name__ == "__main__":
    main()
