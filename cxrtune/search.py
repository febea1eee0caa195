"""The distributed search: Ray Tune + Optuna (TPE) + ASHA over the training engine.

This is the only module that imports Ray. The driver prepares the data once (the
image cache and the split) and puts the cached pixels in Ray's object store; every
trial reads them from there (zero-copy on its node) and never decodes a file. Each
trial is ``engine.fit`` with a reporter that calls ``tune.report`` with a checkpoint
every epoch and resumes from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import pandas as pd
import torch

from .atomic import write_text
from .config import DataConfig
from .data.cache import ImageCache
from .data.labels import SCHEMES
from .data.pipeline import PreparedData, prepare_data
from .cv import cv_state, evaluate_ensemble, fit_cv, is_cv_checkpoint, refit_and_evaluate
from .engine import CHECKPOINT_FILE, evaluate_checkpoint, fit, read_checkpoint
from .errors import ConfigError, SearchFailed, SearchInterrupted
from .logs import quiet_libraries
from .pareto import choose
from .selection import best_index, direction, rank_key
from .space import ReportConfig, SearchSettings, SearchSpec, check_inputs, define_by_run, grid_points, optuna_sampler
# what became of a trial: the words the MLflow child runs carry too
from .tracking import (COMPLETED, FAILED, NOT_STARTED, STOPPED_EARLY, Tracker, TrialLogger, TrialRecord,
                       ended_as, error_text, flatten)
from .train import train

# The classic CLIReporter progress table (trial, status, epoch, metric); must be set
# before Ray Tune is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from ray.tune import Callback, CLIReporter  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

log = logging.getLogger(__name__)


class ProgressTable(CLIReporter):
    """Ray's live trial table, on stderr: stdout stays for the result (e.g. --json)."""

    def report(self, trials, done, *sys_info) -> None:
        text = self._progress_str(trials, done, *sys_info)
        # "Result logdir" names Ray's driver artifacts, not the search's results folder
        text = "\n".join(line for line in text.splitlines() if not line.startswith("Result logdir:"))
        print(text, file=sys.stderr, flush=True)


STATE_FILE = "cxrtune_search.json"
FAILED_FILE = "FAILED"


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
    removed: tuple = ()
    removed_path: Optional[str] = None

    @classmethod
    def of(cls, data: PreparedData) -> "SharedData":
        c = data.cache
        return cls(np.asarray(c.images), c.fingerprint, c.size, str(c.directory), c.paths, data.split,
                   str(data.split_path), data.cfg, data.dropped, data.removed,
                   str(data.removed_path) if data.removed_path else None)

    def prepared(self) -> PreparedData:
        cache = ImageCache(self.fingerprint, self.size, Path(self.cache_dir), self.paths, (), self.images)
        return PreparedData(self.data_cfg, SCHEMES.get(self.data_cfg.task), self.split,
                            Path(self.split_path), cache, self.dropped, (), self.removed,
                            Path(self.removed_path) if self.removed_path else None)


# ------------------------------------------------------------------ the trainable


def searched_metric(metric: str) -> str:
    """The key Tune searches on: the trial's best-so-far value of ``metric``. Optuna learns
    from each trial's last result and ASHA compares trials at rungs; with the best-so-far
    both see the value the final choice (the trial's best epoch) is made on."""
    return f"best/{metric}"


class StorageNotShared(RuntimeError):
    """The trial's node does not see the search's storage folder (a node that joined after
    the start-up check): a retry may land on a node that does."""


# Errors a retry can fix: the trial's process, node or GPU share was the problem, not
# the trial. Everything else (a diverged trial, a bad weights file, a bug) would fail
# again the same way, so it is not retried.
RETRYABLE = (ConnectionError, TimeoutError, torch.cuda.OutOfMemoryError, StorageNotShared)


class TrialFolder:
    """The trial's folder in the search's storage (a local or shared path, or s3://...),
    through Tune's own filesystem for it: every node and every later attempt of the
    trial sees it. (``tune.get_context().get_trial_dir()`` is a staging folder on the
    driver's machine, not what a trial on another node, or after a resume, finds.)"""

    def __init__(self) -> None:
        from ray import tune

        storage = tune.get_context().get_storage()
        self.fs, self.path = storage.storage_filesystem, storage.trial_fs_path
        self.local = type(self.fs).__name__ == "LocalFileSystem"

    def _exists(self, path: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(path).type != FileType.NotFound

    def failure(self) -> Optional[str]:
        """What an earlier attempt of this trial failed with, if it could not be retried."""
        marker = f"{self.path}/{FAILED_FILE}"
        if not self._exists(marker):
            return None
        with self.fs.open_input_stream(marker) as f:
            return f.read().decode()

    def mark_failed(self, text: str) -> None:
        self.fs.create_dir(self.path)
        with self.fs.open_output_stream(f"{self.path}/{FAILED_FILE}") as f:
            f.write(text.encode())

    def recorded_checkpoint(self):
        """The checkpoint of the trial's last RECORDED result (Tune's result.json in the
        storage), as a ``tune.Checkpoint``. After the driver is killed, Tune's last
        snapshot may predate it (continuing from the snapshot would train recorded epochs
        twice), and newer checkpoint folders may exist whose results never reached the
        driver (continuing from those would leave epochs out of the record)."""
        from ray import tune

        results = f"{self.path}/result.json"
        if not self._exists(results):
            return None
        with self.fs.open_input_stream(results) as f:
            lines = f.read().decode().splitlines()
        for line in reversed(lines):
            try:
                name = json.loads(line).get("checkpoint_dir_name")
            except ValueError:  # a line cut short by the kill
                continue
            if name and self._exists(f"{self.path}/{name}/{CHECKPOINT_FILE}"):
                return tune.Checkpoint(f"{self.path}/{name}", filesystem=self.fs)
        return None

    def check_visible(self, spec: SearchSpec) -> None:
        """check_storage_shared vetted the nodes there were at the start; a node that joins
        later and lacks the mount would write this trial's checkpoints to its own disk,
        where no restart elsewhere finds them. The driver's state file beside the trial
        folders is what a node that mounts the folder sees."""
        import ray

        experiment = Path(self.path).parent
        if self.local and not (experiment / STATE_FILE).exists():
            raise StorageNotShared(
                f"storage.path={spec.storage.path!r}: node {ray.util.get_node_ip_address()} cannot see {experiment} "
                "(it joined after the search started and does not mount that folder); mount it there at the "
                "same path, or use an s3:// storage.path")


def run_trial(config: dict[str, Any], spec: SearchSpec, shared: SharedData) -> None:
    """The Ray Tune function trainable: one trial of the space at the point ``config``."""
    import ray
    from ray import tune

    quiet_libraries()  # this is the trial's process: a line per checkpoint is noise
    folder = TrialFolder()
    folder.check_visible(spec)
    failed = folder.failure()
    if failed is not None:
        # Tune retries every failure (FailureConfig is for dead workers and nodes); a
        # deterministic one fails again at once instead of training again.
        raise TrialFailed(failed)
    cfg = spec.trial_config(point_of(config))
    # the trial's GPU share bounds the memory its images may take there
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, epochs=spec.max_epochs,
                                                            gpu_share=min(spec.resources.gpu, 1.0) or 1.0))
    data = shared.prepared()
    node = ray.get_runtime_context().get_node_id()
    patience = cfg.loop.early_stopping_patience
    # the other objectives, as Optuna is told them: their values at the trial's best epoch
    others = [o.metric for o in spec.objectives[1:]]
    at_best: dict[str, float] = {}

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        stale = metrics["epoch"] - metrics["best_epoch"]
        best = metrics["best"]  # None while every epoch's value was NaN
        if metrics["best_epoch"] == metrics["epoch"]:
            at_best.update({m: metrics.get(m, float("nan")) for m in others})
        searched = {searched_metric(m): at_best.get(m, float("nan")) for m in others}
        tune.report({**metrics, searched_metric(spec.metric): float("nan") if best is None else best, **searched,
                     "node_id": node,
                     # the trial ends itself (early stopping): not a trial the scheduler pruned
                     "early_stopped": float(bool(patience) and stale >= patience)},
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    with tempfile.TemporaryDirectory(prefix="cxrtune-trial-") as work:
        resume = _restore_checkpoint(folder, Path(work))
        if resume is not None and others:
            at_best.update(_values_at_best_epoch(resume, others))
        try:
            if spec.search.cv:
                fit_cv(cfg, data, report, workdir=Path(work) / "run", resume=resume)
            else:
                fit(cfg, data, report, workdir=Path(work) / "run", resume=resume)
        except RETRYABLE:
            raise
        except Exception as exc:
            folder.mark_failed(f"{type(exc).__name__}: {exc}")
            raise


def _values_at_best_epoch(checkpoint: Path, metrics: list[str]) -> dict[str, float]:
    """``metrics`` at the best epoch so far of a restored trial (its checkpoint's history)."""
    progress = cv_state(checkpoint) if is_cv_checkpoint(checkpoint) else read_checkpoint(checkpoint)["progress"]
    if progress["best_epoch"] < 1:
        return {}
    epoch = progress["history"][progress["best_epoch"] - 1]
    return {m: float(epoch.get(m, float("nan"))) for m in metrics}


class TrialFailed(RuntimeError):
    """A trial's earlier attempt failed in a way a retry cannot fix (its text is kept)."""


def _restore_checkpoint(folder: TrialFolder, work: Path) -> Optional[Path]:
    """Copy the trial's last checkpoint (after a worker/node failure or a resumed search)
    to local disk; None for a fresh trial."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    recorded = folder.recorded_checkpoint()
    if recorded is not None and (checkpoint is None or Path(recorded.path).name > Path(checkpoint.path).name):
        log.info("continuing from %s", recorded.path)
        checkpoint = recorded
    if checkpoint is None:
        return None
    return Path(checkpoint.to_directory(str(work / "restored")))


# ------------------------------------------------------------------ Tune objects


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """The searched values of a trial: grid trials carry them under "point", Optuna's flat."""
    return dict(config.get("point", config))


class TrialSearcher(OptunaSearch):
    """OptunaSearch that tells Optuna a trial the scheduler stopped early is PRUNED (TPE
    then ranks it by its intermediate values, below finished trials) instead of COMPLETE
    with a partial value."""

    def __init__(self, *args: Any, max_epochs: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if error or not result or trial_id in self._completed_trials or not _pruned(result, self.max_epochs):
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def _pruned(result: dict, max_epochs: int) -> bool:
    """Whether a trial's last result is that of a trial the scheduler stopped early."""
    return ended_as(result, max_epochs) == STOPPED_EARLY


def _search_alg(spec: SearchSpec) -> tuple[Any, int, Optional[dict]]:
    """(search algorithm, number of samples, param_space)."""
    from ray import tune

    if spec.search.algorithm == "grid":
        # Ray's grid over whole points keeps conditional parameters out of the product.
        points = grid_points(spec)
        log.info("grid search: %d points (search.num_samples is ignored)", len(points))
        return None, 1, {"point": tune.grid_search(points)}
    objectives = spec.objectives
    if spec.multi_objective:  # Optuna learns the front; ASHA (TuneConfig's metric) the first objective
        metric: Any = [searched_metric(o.metric) for o in objectives]
        mode: Any = [o.mode for o in objectives]
    else:
        metric, mode = searched_metric(spec.metric), spec.mode
    alg = TrialSearcher(space=define_by_run(spec), metric=metric, mode=mode, sampler=optuna_sampler(spec),
                        max_epochs=spec.max_epochs)
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
    return ProgressTable(metric_columns={"epoch": "epoch", spec.metric: spec.metric,
                                         searched_metric(spec.metric): "best so far"},
                       # (its "current best trial" line ranks by TuneConfig's metric: the
                       # best-so-far, so it never goes down)
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
    return spec.results_dir


class MlflowCallback(Callback):
    """The Tune callback that logs each trial to MLflow, on the driver: Tune's hooks are
    handed to a ``tracking.TrialLogger`` (which knows no Ray). Tuner pickles it into
    tuner.pkl without its live tracker; after ``Tuner.restore`` the driver attaches its
    own (``attach_restored``)."""

    def __init__(self, logger: TrialLogger) -> None:
        self.logger = logger

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.logger.on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.logger.on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.logger.on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.logger.on_trial_error(iteration, trials, trial, **info)

    @staticmethod
    def attach_restored(tuner: Any, tracker: Tracker) -> int:
        """Attach ``tracker`` to the callbacks ``Tuner.restore`` unpickled (Ray 2.60 takes
        no new callbacks on restore; they sit in the tuner's RunConfig). Returns how many."""
        local = getattr(tuner, "_local_tuner", None)  # None with Ray Client: callbacks run remotely
        callbacks = local.get_run_config().callbacks if local is not None else None
        found = [cb for cb in callbacks or [] if isinstance(cb, MlflowCallback)]
        for cb in found:
            cb.logger.attach(tracker)
        return len(found)

    @staticmethod
    def trial_records(analysis) -> list[TrialRecord]:
        """What Tune knows of every trial (an ``ExperimentAnalysis``), for ``Tracker.reconcile``."""
        frames = analysis.trial_dataframes
        records = []
        for t in analysis.trials:
            df = frames.get(t.trial_id)
            try:
                error = error_text(t) if t.status == "ERROR" else None
            except Exception:  # noqa: BLE001 - the error file's storage may be gone
                error = "unknown error"
            records.append(TrialRecord(str(t.trial_id), point_of(t.config or {}),
                                       [] if df is None else df.to_dict("records"), str(t.status), error,
                                       getattr(t, "custom_trial_name", None)))
        return records


# ------------------------------------------------------------------ driver


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing answers at ``address`` (Ray itself retries for minutes)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc}); check that the head "
                          "node is up (`ray status` on it) and the address is host:6379 or "
                          "ray://host:10001, or leave --address and RAY_ADDRESS out to start a local "
                          "Ray") from None


def _describe_cluster() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return (f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs")


def init_ray(address: Optional[str]) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS); without one, start a Ray of this
    search's own, never a cluster someone else started on this machine."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return
    _ray_output_to_stderr()
    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ConfigError(f"--address {address}: cannot join the Ray cluster ({exc}); start one with "
                              "`ray up cluster.yaml` or `ray start --head`, or leave --address out") from None
        except RuntimeError as exc:  # Ray refuses a driver whose Ray or Python differs from the cluster's
            raise ConfigError(f"--address {address}: cannot join the Ray cluster: {' '.join(str(exc).split())}; "
                              "run the search with the cluster's own environment (on the head: the venv its "
                              "setup_commands made), or name the right cluster as --address HOST:6379") from None
        log.info("joined the Ray cluster at %s: %s", address, _describe_cluster())
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
        log.info("started a local Ray: %s", _describe_cluster())


def _ray_output_to_stderr() -> None:
    """Ray prints what trial workers write on stdout, and its cluster notices (e.g. "Raylet
    is terminated" when a node dies), on the driver's stdout; the driver's stdout is for
    the result (--json), so they go to stderr. Ray has no option for it: the function it
    prints them with is wrapped, before ``ray.init`` (a Ray without it is left alone)."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "cxrtune_stderr", False):
        return

    def to_stderr(data: dict, *args: Any, **kwargs: Any) -> None:
        original({**data, "is_err": True}, *args, **kwargs)

    to_stderr.cxrtune_stderr = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_stderr


def _autoscaled_fit(need: dict[str, float]) -> bool:
    """Whether the cluster's autoscaler config (``ray up``) has a node type that fits
    ``need`` and may still be started. A local Ray has no such config."""
    from ray._private.state import state  # what Ray Train and Ray Data read it with

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or unusual cluster: assume it cannot scale
        return False
    groups = config.node_group_configs if config is not None else []
    return any(g.max_count != 0 and all(g.resources.get(k, 0) >= v for k, v in need.items()) for g in groups)


def check_trial_fits(spec: SearchSpec) -> None:
    """Refuse (in seconds) a search whose trials no node can ever run: Tune would keep
    them PENDING forever."""
    import ray

    need = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(r.get(k, 0.0) >= v for k, v in need.items()) for r in nodes):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU + {r.get('GPU', 0):g} GPU" for r in nodes) or "no nodes"
    what = f"a trial needs {need['CPU']:g} CPU + {need['GPU']:g} GPU (resources in {spec.file})"
    if _autoscaled_fit(need):
        log.warning("%s; no node has that yet (%s): waiting for the autoscaler to add one", what, have)
        return
    fix = ("set resources.gpu: 0 to train on CPUs, or join a cluster with GPUs (--address)"
           if need["GPU"] > 0 else "lower resources.cpu")
    raise ConfigError(f"{what}, but no node of this Ray cluster has that ({have}); {fix}")


def check_storage_writable(spec: SearchSpec) -> None:
    """An unwritable results folder fails now, not after the first trial's first epoch."""
    path = spec.storage.resolved()
    if "://" in path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cxrtune-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"storage.path={spec.storage.path!r}: cannot write there ({exc.strerror or exc}); "
                          "choose a folder you can write (--set storage.path=...)") from None


def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_storage_shared(spec: SearchSpec) -> None:
    """On a cluster, a local ``storage.path`` must be a folder every node mounts: trials
    write their checkpoints there and restart from them on other nodes. A file written
    here must be visible from every node that can run a trial, or the search fails now."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = spec.storage.resolved()
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if "://" in path or all(n["NodeID"] == here for n in nodes):
        return  # a URI, or trials only run where the driver runs
    with tempfile.NamedTemporaryFile(dir=path, prefix=".cxrtune-shared-test-") as probe:
        sees = ray.remote(num_cpus=0)(_sees)
        found = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                         .remote(probe.name) for n in nodes], timeout=60)
    blind = sorted({n["NodeManagerAddress"] for n, ok in zip(nodes, found) if not ok})
    if blind:
        raise ConfigError(f"storage.path={spec.storage.path!r} is not shared: nodes {', '.join(blind)} cannot "
                          f"see {path}; use a folder every node mounts (NFS, EFS) or an s3:// URI "
                          "(--set storage.path=s3://BUCKET/ray_results)")


def _versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported for it). MLflow
    may be installed as mlflow-skinny alone (no "mlflow" distribution)."""
    from importlib.metadata import PackageNotFoundError, version

    def first(*names: str) -> str:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return "not installed"

    return {"cxrtune": first("cxrtune"), "torch": first("torch"), "ray": first("ray"),
            "optuna": first("optuna"), "mlflow": first("mlflow", "mlflow-skinny")}


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
    write_text(path, json.dumps(state, indent=2))


def _start_tracking(spec: SearchSpec, data: PreparedData, state: dict) -> tuple[Tracker, Optional[str]]:
    tracker = Tracker(spec.tracking.resolved_uri(), spec.tracking.experiment_name(spec.name))
    params = {"space_file": spec.file, "algorithm": spec.search.algorithm,
              "scheduler": spec.search.scheduler.name, "metric": spec.metric, "mode": spec.mode,
              "num_samples": spec.search.num_samples, "max_concurrent": spec.search.max_concurrent,
              "max_epochs": spec.max_epochs, "seed": spec.search.seed,
              "source": data.cfg.source, "task": data.cfg.task, "image_size": data.cache.size,
              "data_fingerprint": data.cache.fingerprint, "dedupe": data.cfg.dedupe,
              "exclude": data.cfg.exclude or "none", "cv": spec.search.cv,
              **{f"data.{k}": v for k, v in data.change_counts().items()}}
    tags = {"cxrtune.search": spec.name, "cxrtune.git_commit": _git_commit(),
            **{f"version.{k}": v for k, v in _versions().items()}}
    files = [Path(spec.file), data.split_path, *([data.removed_path] if data.removed_path else [])]
    parent = tracker.start_parent(spec.name, params, tags, files, state.get("parent_run_id"))
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
        metric=searched_metric(spec.metric), mode=spec.mode, search_alg=alg, scheduler=_scheduler(spec),
        num_samples=num_samples, max_concurrent_trials=spec.search.max_concurrent,
        time_budget_s=spec.search.time_budget_s,
        # Reusing a trial's worker process skips re-importing torch and starting CUDA (7-9 s).
        reuse_actors=True)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=_run_config(spec, spec.storage.resolved(), callbacks))


class _RestoreFailed(logging.Handler):
    """Tune logs a run state it cannot restore (an unreadable state file, a lock it may not
    take) and then starts the search afresh: a new state that hides the finished trials,
    whose MLflow runs would then look orphaned and be deleted. Raising from that log call
    is the one hook there is: fit() stops there, before any trial starts or file changes."""

    def __init__(self, where: str) -> None:
        super().__init__(logging.ERROR)
        self.where = where

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Failed to restore the run state"):
            cause = record.exc_info[1] if record.exc_info else None
            raise SearchFailed(f"cannot resume the search at {self.where}: Tune could not restore its state "
                               f"({type(cause).__name__}: {cause}); nothing was changed: fix that and run the "
                               "same command with --resume again")


@contextlib.contextmanager
def _stop_if_restore_fails(where: str, enabled: bool):
    logger = logging.getLogger("ray.tune.execution.tune_controller")
    handler = _RestoreFailed(where)
    if enabled:
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


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


def _space_record(spec: SearchSpec) -> dict[str, Any]:
    """What a resumed search must share with the one it continues (everything but names)."""
    record = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("name", "file")}
    return json.loads(json.dumps(record, default=str))


def _added_search_defaults(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Search and report settings a newer cxrtune added, at their defaults: a search an
    older one started did the same without them (settings that change the data are not
    excused)."""
    sections = {"search": SearchSettings(), "report": ReportConfig()}
    defaults = flatten(json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in sections.items()}, default=str)))
    return {k for k in new.keys() - old.keys() if k in defaults and new[k] == defaults[k]}


def _check_same_space(spec: SearchSpec, state: dict[str, Any]) -> None:
    """--resume with a changed space file (or other --set values) would mix two searches."""
    before = state.get("space")
    if before is None:
        return
    old, new = flatten(before), flatten(_space_record(spec))
    added = _added_search_defaults(old, new)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in added)
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        raise ConfigError(f"--resume: {spec.file} (with its --set values) differs from the space search "
                          f"{spec.name!r} was started with ({diffs}); resume with the original file and "
                          "--set values, or run without --resume to start a new search")


def run_search(spec: SearchSpec, *, address: Optional[str] = None, resume: bool = False,
               test_front: bool = False) -> dict[str, Any]:
    """Run (or resume) the search ``spec``; returns a summary with the best trial and its test scores.

    Everything that can be checked is checked before the MLflow parent run is created
    (storage, cluster, resources); from then on every failure (Ctrl-C included) ends the
    parent run as FAILED or KILLED, never leaving it RUNNING."""
    quiet_libraries()
    spec = with_run_name(spec, resume)
    state_path = _state_path(spec)
    state = _load_state(state_path) if resume else {}
    if resume:
        _check_same_space(spec, state)
        if state.get("summary"):
            log.info("search %r has already finished; nothing to resume (its summary follows)", spec.name)
            return state["summary"]
    check_storage_writable(spec)
    check_inputs(spec)
    init_ray(address)
    check_trial_fits(spec)
    check_storage_shared(spec)
    data = prepare_data(spec.data)
    tracker, parent = _start_tracking(spec, data, state)
    state = {"parent_run_id": parent, "space_file": spec.file, "name": spec.name, "space": _space_record(spec)}
    _save_state(state_path, state)
    try:
        callbacks = [MlflowCallback(tracker.trial_logger(metric=spec.metric, mode=spec.mode,
                                                         max_epochs=spec.max_epochs, params_of=point_of))]
        tuner = _build_tuner(spec, SharedData.of(data), callbacks, resume)
        if resume:  # Tuner.restore brought back its own (pickled) callbacks, without a tracker
            MlflowCallback.attach_restored(tuner, tracker)
        with _stop_if_restore_fails(experiment_dir(spec), enabled=resume):
            results = tuner.fit()
        summary = _finish(spec, data, results, tracker, parent, test_front)
    except (KeyboardInterrupt, SearchInterrupted):
        tracker.end_parent(parent, status="KILLED")
        raise
    except BaseException:
        tracker.end_parent(parent, status="FAILED")
        raise
    finally:
        tracker.close()  # flushes what an MLflow outage held back, as far as it can
    summary.update(mlflow_skipped_calls=tracker.skipped, mlflow_not_logged=tracker.not_logged())
    _save_state(state_path, {**state, "summary": summary})
    return summary


# ------------------------------------------------------------------ after the search


def _trial_id(result) -> Optional[str]:
    """A result's trial id; trials that never reported carry it only in their folder name."""
    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    m = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", Path(str(result.path or "")).name)
    return m.group(1) if m else None


def _creation_order(trial_id: Optional[str]) -> tuple[int, str]:
    """Tune numbers trials in creation order: ..._00000, ..._00001."""
    tail = (trial_id or "").rsplit("_", 1)[-1]
    return (int(tail) if tail.isdigit() else 1 << 30, trial_id or "")


def _trial_status(result, max_epochs: int) -> str:
    if result.error:
        return FAILED
    last = result.metrics or {}
    if not last.get("epoch"):
        return NOT_STARTED
    return ended_as(last, max_epochs)


def _error_cause(error: BaseException) -> str:
    """The trial's own exception, not Ray's wrapper around it (and its traceback)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _trial_rows(spec: SearchSpec, results) -> list[dict[str, Any]]:
    """Every trial, best first (by its best epoch's value; the earliest trial wins ties),
    then those without a value."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        values = df[spec.metric].tolist() if df is not None and spec.metric in df else []
        i = best_index(values, spec.mode)
        rows.append({"trial_id": _trial_id(r), "status": _trial_status(r, spec.max_epochs),
                     "epochs": int((r.metrics or {}).get("epoch", 0)),
                     "best": None if i is None else float(values[i]),
                     "best_epoch": None if i is None else int(df["epoch"].iloc[i]),
                     "values": {} if i is None else _values_at(df, i, _choice_metrics(spec)),
                     "config": point_of(r.config or {}), "error": _error_cause(r.error) if r.error else None,
                     "result": r})
    # sorted() is stable and the key breaks no ties: equal values keep creation order
    rows.sort(key=lambda x: _creation_order(x["trial_id"]))
    return sorted(rows, key=lambda x: rank_key(x["best"], spec.mode))


def _choice_metrics(spec: SearchSpec) -> list[str]:
    """What choosing the trial to test looks at: the objectives, the select metric, the limits."""
    named = [o.metric for o in spec.objectives] + [spec.select_metric, *spec.search.select.limits()]
    return list(dict.fromkeys(named))


def _values_at(df: pd.DataFrame, i: int, metrics: list[str]) -> dict[str, Optional[float]]:
    row = df.iloc[i]
    return {m: float(row[m]) if m in row and pd.notna(row[m]) else None for m in metrics}


def _choose(spec: SearchSpec, ranked: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial to test and register, and what the summary says of the choice (the Pareto
    front when there are several objectives). With several objectives or limits the
    candidates are the trials that ran to the end: a trial ASHA stopped has the first
    objective of fewer epochs, and would sit on the front only for being cheap."""
    rule = spec.search.select
    if not spec.multi_objective and not rule.limits() and spec.select_metric == spec.metric:
        return ranked[0], {}
    candidates = [r for r in ranked if r["status"] == COMPLETED] or ranked
    choice = choose([r["values"] for r in candidates], spec.objectives, spec.select_metric,
                    direction(spec.select_metric), rule.limits(), rule.knee)
    front = [candidates[i]["trial_id"] for i in choice.front]
    for r in ranked:
        r["on_front"] = r["trial_id"] in front
    best = candidates[choice.index]
    log.info("tested and registered: trial %s, %s%s", best["trial_id"], choice.reason,
             f"; Pareto front: {', '.join(front)}" if front else "")
    return best, {"objectives": [dataclasses.asdict(o) for o in spec.objectives], "front": front,
                  "selected": best["trial_id"], "reason": choice.reason, "limits": rule.limits()}


def _best_checkpoint(row: dict[str, Any], spec: SearchSpec):
    """The checkpoint of the trial's best epoch (the earliest of equal ones)."""
    result = row["result"]
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("epoch") == row["best_epoch"]:
            return checkpoint
    return result.get_best_checkpoint(spec.metric, spec.mode) or result.checkpoint


def _cv_summary(spec: SearchSpec, row: dict[str, Any]) -> Optional[dict[str, Any]]:
    """A cross-validated search: its folds, how the tested trial was tested, and the spread
    over folds of the metric at the trial's best epoch (None for a plain search)."""
    if not spec.search.cv:
        return None
    df = row["result"].metrics_dataframe
    std = df.loc[df["epoch"] == row["best_epoch"], f"cv/std/{spec.metric}"]
    return {"folds": spec.data.folds, "test": spec.search.cv_test,
            "std": float(std.iloc[0]) if len(std) and pd.notna(std.iloc[0]) else None}


def _best_epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The validation metrics of the trial's best epoch (the one its checkpoint keeps)."""
    df = row["result"].metrics_dataframe
    epoch = df[df["epoch"] == row["best_epoch"]].iloc[0]
    return {k: float(v) for k, v in epoch.items() if str(k).startswith("val/") and pd.notna(v)}


def _disk_used(*paths: str) -> int:
    """Bytes under the given local folders (URIs count 0)."""
    total = 0
    for path in paths:
        if "://" not in path and Path(path).exists():
            total += sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return total


def _checkpoint_dirs(experiment: str) -> list[str]:
    """The checkpoints the trials kept, in a local or mounted results folder (none counted in a URI's)."""
    return [] if "://" in experiment else [str(p) for p in Path(experiment).glob("*/checkpoint_*")]


def _report(spec: SearchSpec, data: PreparedData, rows: list[dict[str, Any]], tracker: Tracker,
            parent: Optional[str], ev: Any = None, tested: Optional[str] = None,
            pareto: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The report bundle and its HTML, logged to the parent run (its test figures on the
    run of the ``tested`` trial too; with a select rule, the ``pareto`` choice and the
    front's files). A report that cannot be built is logged as a warning: the search's
    result stands without it."""
    from .report.build import ReportTrial, report_dir, study_storage, write_report
    from .report.html import write_html

    trials = [ReportTrial(r["trial_id"], r["status"], r["epochs"], r["best"], r["best_epoch"], r["config"],
                          r["error"], _history(r["result"])) for r in rows]
    out = report_dir(spec)
    try:
        report = write_report(out, spec, data, trials, ev, study_storage(spec, experiment_dir(spec)),
                              seed=spec.search.seed, tested=tested, pareto=pareto,
                              front_dir=_front_dir(spec) if pareto else None)
        report["html"] = str(write_html(out, out / "report.html"))
    except Exception as exc:  # noqa: BLE001 - the search's result stands without its report
        log.warning("the search's report could not be built: %s: %s", type(exc).__name__, exc, exc_info=True)
        return {}
    best_files = [f["file"] for f in report["figures"] if f["section"] in ("test", "binary", "curves", "explain")]
    tracker.log_report(parent, tested if ev is not None else None, out, best_files,
                       report.get("test", {}).get("intervals"))
    log.info("report: %s (cxrtune report %s)", report["html"], spec.name)
    return report


def _history(result) -> list[dict[str, float]]:
    """A trial's per-epoch metrics as plain dicts (what the report draws its curves from)."""
    df = result.metrics_dataframe
    if df is None:
        return []
    cols = [c for c in df.columns if c == "epoch" or "/" in str(c)]
    return [{k: float(v) for k, v in rec.items() if pd.notna(v) and isinstance(v, (int, float))}
            for rec in df[cols].to_dict("records")]


def _model_package(data: PreparedData, ev: Any):
    """The best trial's network and the preprocessing its test evaluation applied: what is
    logged and registered (serving/model.py)."""
    from .serving.model import ModelPackage, Preprocessing, spec_of

    prep = Preprocessing(task=data.cfg.task, classes=tuple(data.scheme.classes), image_size=data.cache.size,
                         input_mean=float(ev.input_stats[0]), input_std=float(ev.input_stats[1]),
                         in_channels=ev.config.model.in_channels, cxrnorm=ev.config.preprocess)
    return ModelPackage(ev.model, spec_of(ev.config, prep, folds=len(getattr(ev.model, "members", [ev.model]))))


def _test_evaluation(spec: SearchSpec, checkpoint: Path, data: PreparedData, row: dict[str, Any]):
    """A trial's checkpoint scored on the test split: its model, or for a cross-validated
    trial its folds' ensemble or a model refit on train+val (search.cv_test)."""
    if not is_cv_checkpoint(checkpoint):
        return evaluate_checkpoint(checkpoint, data, "test")
    if spec.search.cv_test == "ensemble":
        return evaluate_ensemble(checkpoint, data, "test")
    return refit_and_evaluate(checkpoint, data, row["best_epoch"])


def _front_tests(spec: SearchSpec, data: PreparedData, rows: list[dict[str, Any]], pareto: dict[str, Any],
                 selected_metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The test metrics of every front member (``--test-front``); the selected trial's are
    those already computed."""
    tests = {pareto["selected"]: selected_metrics}
    for row in rows:
        if row["trial_id"] in pareto["front"] and row["trial_id"] not in tests:
            with _best_checkpoint(row, spec).as_directory() as ckpt_dir:
                tests[row["trial_id"]] = _test_evaluation(spec, Path(ckpt_dir), data, row).metrics
    return tests


def _log_front(spec: SearchSpec, data: PreparedData, rows: list[dict[str, Any]], pareto: dict[str, Any],
               selected_metrics: dict[str, float], tracker: Tracker, parent: Optional[str],
               test_front: bool) -> dict[str, Any]:
    """The front's CSV and plot beside the report folder (``_front_dir``: the report takes
    them from there) and on the parent run (``pareto/``), and its members as a tag; with
    ``test_front``, every member's test metrics too."""
    from .report.front import front_table, write_front

    tests = _front_tests(spec, data, rows, pareto, selected_metrics) if test_front else {}
    table = front_table(rows, spec.objectives, pareto["selected"], tests)
    for path in write_front(_front_dir(spec), table, spec.objectives, spec.select_metric,
                            spec.search.select.limits()):
        tracker.log_path(parent, path, artifact_path="pareto")
    tracker.set_tags(parent, {"cxrtune.pareto_front": ",".join(pareto["front"]),
                              "cxrtune.selected_trial": pareto["selected"],
                              "cxrtune.selected_by": pareto["reason"]})
    return {**pareto, "front_test": tests}


def _front_dir(spec: SearchSpec) -> Path:
    """Where the front's CSV and plot go: ``<results>/<search>/pareto/``, beside the report."""
    from .report.build import report_dir

    return report_dir(spec).parent / "pareto"


def _finish(spec: SearchSpec, data: PreparedData, results, tracker: Tracker, parent: Optional[str],
            test_front: bool = False) -> dict:
    from ray.tune import ExperimentAnalysis

    rows = _trial_rows(spec, results)
    analysis = ExperimentAnalysis(experiment_dir(spec))  # every trial, errored ones included
    tracker.drop_orphan_children([t.trial_id for t in analysis.trials])
    # Runs of trials not logged during an MLflow outage, or left RUNNING by a killed driver.
    tracker.reconcile(MlflowCallback.trial_records(analysis), spec.metric, spec.mode, spec.max_epochs)
    # neither finished nor failed: the search was interrupted (Ctrl-C)
    unfinished = [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SearchInterrupted(f"search {spec.name!r} was interrupted with {len(unfinished)} trial(s) "
                                f"unfinished; continue it with: cxrtune search {spec.file} --resume "
                                "(and the same --set values)")
    ranked = [r for r in rows if r["best"] is not None]
    if not ranked:
        _report(spec, data, rows, tracker, parent)
        first = next((r for r in sorted(rows, key=lambda x: _creation_order(x["trial_id"])) if r["error"]), None)
        raise SearchFailed(f"all {len(rows)} trials of {spec.name!r} failed; the first "
                           f"({first['trial_id'] if first else '-'}) with {first['error'] if first else '-'}")
    # Selection uses validation scores only; the test split is touched once, afterwards.
    best_row, pareto = _choose(spec, ranked)
    best = best_row["result"]
    checkpoint = _best_checkpoint(best_row, spec)
    with checkpoint.as_directory() as ckpt_dir:
        ev = _test_evaluation(spec, Path(ckpt_dir), data, best_row)
        if pareto:
            pareto = _log_front(spec, data, rows, pareto, ev.metrics, tracker, parent, test_front)
        package = _model_package(data, ev)
        tracker.log_best(parent, best_row["trial_id"], point_of(best.config), _best_epoch_metrics(best_row),
                         ev.metrics, ev.confusion, list(data.scheme.classes), Path(ckpt_dir), package,
                         spec.tracking.register_model)
        report = _report(spec, data, rows, tracker, parent, ev, best_row["trial_id"], pareto)
    tracker.end_parent(parent, status="FINISHED")
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED_EARLY, FAILED, NOT_STARTED)}
    checkpoints = _checkpoint_dirs(experiment_dir(spec))
    return {"name": spec.name, "space_file": spec.file, "experiment_dir": experiment_dir(spec),
            "metric": spec.metric, "mode": spec.mode, "n_trials": len(rows), "n_failed": counts[FAILED],
            "counts": counts, "trials": [{k: v for k, v in r.items() if k != "result"} for r in rows],
            "best_trial": best_row["trial_id"], "best_epoch": best_row["best_epoch"],
            "best_config": point_of(best.config), "best_val": best_row["best"],
            "best_checkpoint": str(checkpoint.path), "test_metrics": ev.metrics,
            "confusion": ev.confusion.tolist(), "classes": list(data.scheme.classes),
            "mlflow_parent_run": parent, "mlflow_ui": tracker.ui_command(),
            "registered_model": tracker.registered,
            "test_intervals": report.get("test", {}).get("intervals", {}), "pareto": pareto,
            "cv": _cv_summary(spec, best_row),
            "report": report.get("html"), "optuna_dashboard": report.get("optuna", {}).get("dashboard"),
            "n_checkpoints": len(checkpoints),
            "disk_bytes": {"results": _disk_used(experiment_dir(spec)), "checkpoints": _disk_used(*checkpoints),
                           "cache": _disk_used(str(data.cache.directory.parent))}}


def debug_trial(spec: SearchSpec, output: Optional[str] = None) -> dict[str, Any]:
    """`cxrtune search --debug`: one point of the space, in-process, no Ray (as `train --debug`)."""
    quiet_libraries()  # Optuna is imported now: its "new study created" line is noise
    if spec.search.algorithm == "grid":
        point = grid_points(spec)[0]
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.search.seed))
        trial = study.ask()
        define_by_run(spec)(trial)
        point = dict(trial.params)
    log.info("debug trial of %s at %s", spec.name, point)
    if spec.search.cv:
        log.info("search.cv: the debug trial trains one fold (data.fold=%d) of %d", spec.data.fold, spec.data.folds)
    cfg = spec.trial_config(point)
    out = output or str(Path("cxrtune_runs") / f"{spec.name}-debug")
    cfg = dataclasses.replace(cfg, output_dir=out)
    return {"point": point, **train(cfg, debug=True, overwrite=True)}
