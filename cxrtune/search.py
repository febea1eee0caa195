"""The distributed search: Ray Tune + Optuna (TPE) + ASHA over the training engine.

This is the only module that imports Ray. The driver prepares the data once (the
image cache and the split) and puts the cached pixels in Ray's object store; every
trial reads them from there (zero-copy on its node) and never decodes a file. Each
trial is ``engine.fit`` with a reporter that calls ``tune.report`` with a checkpoint
every epoch and resumes from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import pandas as pd

from .config import DataConfig, to_dict
from .data.cache import ImageCache
from .data.labels import SCHEMES
from .data.pipeline import PreparedData, prepare_data
from .engine import TrainingDiverged, evaluate_checkpoint, fit
from .errors import ConfigError
from .space import SearchSpec, define_by_run, grid_points, optuna_sampler
from .tracking import Tracker
from .train import train

# The classic CLIReporter progress table (trial, status, epoch, metric); must be set
# before Ray Tune is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from ray.tune import CLIReporter  # noqa: E402

log = logging.getLogger(__name__)


class ProgressTable(CLIReporter):
    """Ray's live trial table, on stderr: stdout stays for the result (e.g. --json)."""

    def report(self, trials, done, *sys_info) -> None:
        print(self._progress_str(trials, done, *sys_info), file=sys.stderr, flush=True)

STATE_FILE = "cxrtune_search.json"
DIVERGED_FILE = "DIVERGED"


# ------------------------------------------------------------------ data shared with trials


@dataclass(frozen=True)
class SharedData:
    """What a trial needs of the prepared data, in a form Ray can ship to any node:
    the pixels travel through the object store, not the driver's file system."""

    images: np.ndarray
    fingerprint: str
    size: int
    cache_dir: str
    paths: tuple[str, ...]
    split: pd.DataFrame
    split_path: str
    data_cfg: DataConfig
    dropped: dict

    @classmethod
    def of(cls, data: PreparedData) -> "SharedData":
        c = data.cache
        return cls(np.asarray(c.images), c.fingerprint, c.size, str(c.directory), c.paths, data.split,
                   str(data.split_path), data.cfg, data.dropped)

    def prepared(self) -> PreparedData:
        cache = ImageCache(self.fingerprint, self.size, Path(self.cache_dir), self.paths, (), self.images)
        return PreparedData(self.data_cfg, SCHEMES.get(self.data_cfg.task), self.split,
                            Path(self.split_path), cache, self.dropped)


# ------------------------------------------------------------------ the trainable


def _diverged_marker() -> Path:
    from ray import tune

    return Path(tune.get_context().get_trial_dir()) / DIVERGED_FILE


def run_trial(config: dict[str, Any], spec: SearchSpec, shared: SharedData) -> None:
    """The Ray Tune function trainable: one trial of the space at the point ``config``."""
    import ray
    from ray import tune

    marker = _diverged_marker()
    if marker.exists():
        # A diverged trial would diverge again from its last checkpoint: fail at once
        # instead of spending the retries FailureConfig keeps for dead workers and nodes.
        raise TrainingDiverged(marker.read_text())
    cfg = spec.trial_config(point_of(config))
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, epochs=spec.max_epochs))
    data = shared.prepared()

    node = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        tune.report({**metrics, "node_id": node},
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    with tempfile.TemporaryDirectory(prefix="cxrtune-trial-") as work:
        resume = _restore_checkpoint(Path(work))
        try:
            fit(cfg, data, report, workdir=Path(work) / "run", resume=resume)
        except TrainingDiverged as exc:
            marker.write_text(str(exc))
            raise


def _restore_checkpoint(work: Path) -> Optional[Path]:
    """Copy the trial's last reported checkpoint (after a worker/node failure or a
    resumed search) to local disk; None for a fresh trial."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    target = work / "restored"
    with checkpoint.as_directory() as d:
        shutil.copytree(d, target)
    return target


# ------------------------------------------------------------------ Tune objects


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """The searched values of a trial: grid trials carry them under "point", Optuna's flat."""
    return dict(config.get("point", config))


def _search_alg(spec: SearchSpec) -> tuple[Any, int, Optional[dict]]:
    """(search algorithm, number of samples, param_space)."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if spec.search.algorithm == "grid":
        # Ray's grid over whole points keeps conditional parameters out of the product.
        points = grid_points(spec)
        log.info("grid search: %d points (search.num_samples is ignored)", len(points))
        return None, 1, {"point": tune.grid_search(points)}
    alg = OptunaSearch(space=define_by_run(spec), metric=spec.metric, mode=spec.mode,
                       sampler=optuna_sampler(spec))
    return alg, spec.search.num_samples, None


def _scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.search.scheduler
    if s.name == "asha":
        # time_attr "epoch": the engine's own count, which survives restarts from checkpoints.
        return ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    return FIFOScheduler()


def _reporter(spec: SearchSpec):
    prefix = "point/" if spec.search.algorithm == "grid" else ""  # Ray looks nested keys up by "/"
    return ProgressTable(metric_columns={"epoch": "epoch", spec.metric: spec.metric, "val/loss": "val loss"},
                       # conditional parameters are absent from some trials: the table
                       # cannot look them up
                       parameter_columns=[prefix + p.name for p in spec.params if not p.when][:6],
                       max_report_frequency=15,
                       sort_by_metric=True)


def _run_config(spec: SearchSpec, storage: str, callbacks: list):
    from ray import tune

    return tune.RunConfig(
        name=spec.name, storage_path=storage, callbacks=callbacks, progress_reporter=_reporter(spec),
        verbose=1,
        # A trial whose worker or node dies restarts from its last checkpoint.
        failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.storage.keep_checkpoints,
                                                checkpoint_score_attribute=spec.metric,
                                                checkpoint_score_order=spec.mode))


def experiment_dir(spec: SearchSpec) -> str:
    """Where Tune keeps this search: a local path or a URI (s3://...)."""
    return f"{spec.storage.resolved().rstrip('/')}/{spec.name}"


# ------------------------------------------------------------------ driver


def _init_ray(address: Optional[str]) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray on this machine")
        ray.init(include_dashboard=False, log_to_driver=True)


def _versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported for it)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("cxrtune", "torch", "ray", "optuna", "mlflow")}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def _state_path(spec: SearchSpec) -> Path:
    """cxrtune's own resume state (the MLflow parent run): beside Tune's results when they
    are on a local or mounted path, else in the working directory."""
    if "://" in spec.storage.resolved():
        return Path("cxrtune_runs") / f"{spec.name}.{STATE_FILE}"
    return Path(experiment_dir(spec)) / STATE_FILE


def _load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _start_tracking(spec: SearchSpec, data: PreparedData, state: dict) -> tuple[Tracker, Optional[str]]:
    tracker = Tracker(spec.tracking.resolved_uri(), spec.tracking.experiment_name(spec.name))
    params = {"space_file": spec.file, "algorithm": spec.search.algorithm,
              "scheduler": spec.search.scheduler.name, "metric": spec.metric, "mode": spec.mode,
              "num_samples": spec.search.num_samples, "max_concurrent": spec.search.max_concurrent,
              "max_epochs": spec.max_epochs, "seed": spec.search.seed,
              "source": data.cfg.source, "task": data.cfg.task, "image_size": data.cache.size,
              "data_fingerprint": data.cache.fingerprint}
    tags = {"cxrtune.search": spec.name, "cxrtune.git_commit": _git_commit(),
            **{f"version.{k}": v for k, v in _versions().items()}}
    parent = tracker.start_parent(spec.name, params, tags, [Path(spec.file), data.split_path],
                                  state.get("parent_run_id"))
    return tracker, parent


def _build_tuner(spec: SearchSpec, shared: SharedData, callbacks: list, resume: bool):
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec, shared=shared),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if resume:
        log.info("resuming the search at %s (finished trials are kept, not re-run)", experiment_dir(spec))
        return tune.Tuner.restore(experiment_dir(spec), trainable, resume_unfinished=True,
                                  resume_errored=False)
    alg, num_samples, param_space = _search_alg(spec)
    tune_config = tune.TuneConfig(
        metric=spec.metric, mode=spec.mode, search_alg=alg, scheduler=_scheduler(spec),
        num_samples=num_samples, max_concurrent_trials=spec.search.max_concurrent,
        time_budget_s=spec.search.time_budget_s,
        # Reusing a trial's worker process skips re-importing torch and starting CUDA (7-9 s).
        reuse_actors=True)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=_run_config(spec, spec.storage.resolved(), callbacks))


def _searches_named(spec: SearchSpec) -> list[str]:
    """Names of the searches of this space already in storage: name, name-2, name-3, ..."""
    from ray import tune

    names, n = [], 1
    while True:
        name = spec.name if n == 1 else f"{spec.name}-{n}"
        if not tune.Tuner.can_restore(experiment_dir(dataclasses.replace(spec, name=name))):
            return names
        names.append(name)
        n += 1


def with_run_name(spec: SearchSpec, resume: bool) -> SearchSpec:
    """--resume continues the latest search of this space; otherwise a new one is started
    beside earlier ones (demo, demo-2, ...), whose results are never touched."""
    existing = _searches_named(spec)
    if resume:
        if not existing:
            raise ConfigError(f"--resume: no search {spec.name!r} to resume in {spec.storage.resolved()}; "
                              "run without --resume to start one")
        return dataclasses.replace(spec, name=existing[-1])
    if existing:
        name = f"{spec.name}-{len(existing) + 1}"
        log.info("earlier searches of %r are kept in %s; this one is %r (continue the last one with "
                 "--resume)", spec.name, spec.storage.resolved(), name)
        return dataclasses.replace(spec, name=name)
    return spec


def run_search(spec: SearchSpec, *, address: Optional[str] = None, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search ``spec``; returns a summary with the best trial and its test scores."""
    spec = with_run_name(spec, resume)
    data = prepare_data(spec.data)
    state_path = _state_path(spec)
    state = _load_state(state_path) if resume else {}
    tracker, parent = _start_tracking(spec, data, state)
    _save_state(state_path, {"parent_run_id": parent, "space_file": spec.file, "name": spec.name})
    _init_ray(address)
    callbacks = [tracker.callback(metric=spec.metric, mode=spec.mode, max_epochs=spec.max_epochs,
                                  parent_run_id=parent, params_of=point_of)]
    tuner = _build_tuner(spec, SharedData.of(data), callbacks, resume)
    try:
        results = tuner.fit()
        summary = _finish(spec, data, results, tracker, parent)
    except BaseException:
        tracker.end_parent(parent, status="FAILED")
        raise
    finally:
        tracker.close()
    return summary


# ------------------------------------------------------------------ after the search


def _trial_rows(spec: SearchSpec, results) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        best = None
        if df is not None and spec.metric in df:
            col = df[spec.metric].dropna()
            best = float(col.max() if spec.mode == "max" else col.min()) if len(col) else None
        rows.append({"trial_id": r.metrics.get("trial_id") if r.metrics else None,
                     "status": "failed" if r.error else "finished",
                     "epochs": int(r.metrics.get("epoch", 0)) if r.metrics else 0,
                     "best": best, "config": point_of(r.config), "error": str(r.error)[:200] if r.error else None})
    key = (lambda x: -x["best"]) if spec.mode == "max" else (lambda x: x["best"])
    return sorted(rows, key=lambda x: (x["best"] is None, key(x) if x["best"] is not None else 0))


def _trial_ids(spec: SearchSpec) -> list[str]:
    """Every trial of the search, errored ones (which reported nothing) included."""
    from ray.tune import ExperimentAnalysis

    return [t.trial_id for t in ExperimentAnalysis(experiment_dir(spec)).trials]


def _best_epoch_metrics(result, spec: SearchSpec) -> dict[str, float]:
    """The validation metrics of the trial's best epoch (the one its checkpoint keeps)."""
    df = result.metrics_dataframe.dropna(subset=[spec.metric])
    row = df.loc[df[spec.metric].idxmax() if spec.mode == "max" else df[spec.metric].idxmin()]
    return {k: float(v) for k, v in row.items() if str(k).startswith("val/") and pd.notna(v)}


def _finish(spec: SearchSpec, data: PreparedData, results, tracker: Tracker, parent: Optional[str]) -> dict:
    rows = _trial_rows(spec, results)
    tracker.drop_orphan_children(_trial_ids(spec))
    ok = [r for r in results if not r.error]
    if not ok:
        tracker.end_parent(parent, status="FAILED")
        raise RuntimeError(f"all {len(rows)} trials failed; first error: {rows[0]['error'] if rows else '-'}")
    # Selection uses validation scores only; the test split is touched once, afterwards.
    best = results.get_best_result(metric=spec.metric, mode=spec.mode, scope="all", filter_nan_and_inf=True)
    best_row = next(r for r in rows if r["trial_id"] == best.metrics.get("trial_id"))
    checkpoint = best.get_best_checkpoint(spec.metric, spec.mode) or best.checkpoint
    with checkpoint.as_directory() as ckpt_dir:
        ev = evaluate_checkpoint(Path(ckpt_dir), data, "test")
        best_val = _best_epoch_metrics(best, spec)
        preprocessing = {"task": data.cfg.task, "classes": list(data.scheme.classes),
                         "image_size": data.cache.size, "input_mean": ev.input_stats[0],
                         "input_std": ev.input_stats[1], "in_channels": ev.config.model.in_channels,
                         "cxrnorm": to_dict(ev.config.preprocess)}
        tracker.log_best(parent, best.metrics.get("trial_id"), point_of(best.config), best_val, ev.metrics,
                         ev.confusion, list(data.scheme.classes), Path(ckpt_dir), ev.model, preprocessing,
                         spec.tracking.register_model)
    tracker.end_parent(parent, status="FINISHED")
    return {"name": spec.name, "experiment_dir": experiment_dir(spec), "metric": spec.metric,
            "mode": spec.mode, "n_trials": len(rows), "n_failed": sum(r["status"] == "failed" for r in rows),
            "top_trials": rows[:5], "best_trial": best.metrics.get("trial_id"),
            "best_config": point_of(best.config), "best_val": best_row["best"],
            "test_metrics": ev.metrics, "confusion": ev.confusion.tolist(),
            "classes": list(data.scheme.classes), "mlflow_parent_run": parent,
            "mlflow_ui": tracker.ui_command(), "mlflow_skipped_calls": tracker.skipped}


def debug_trial(spec: SearchSpec, output: Optional[str] = None) -> dict[str, Any]:
    """`cxrtune search --debug`: one point of the space, in-process, no Ray (as `train --debug`)."""
    if spec.search.algorithm == "grid":
        point = grid_points(spec)[0]
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.search.seed))
        trial = study.ask()
        define_by_run(spec)(trial)
        point = dict(trial.params)
    log.info("debug trial of %s at %s", spec.name, point)
    cfg = spec.trial_config(point)
    out = output or str(Path("cxrtune_runs") / f"{spec.name}-debug")
    cfg = dataclasses.replace(cfg, output_dir=out)
    return {"point": point, **train(cfg, debug=True, overwrite=True)}
