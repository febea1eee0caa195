"""The ``Tracker``: MLflow runs of one search. The experiment, the parent run (params,
tags, files), a nested child run per trial, reconciliation with what Tune knows, and
the best trial's checkpoint, test metrics, model and its registration. Every write goes
through the tracker's ``Writer`` (writer.py): retried, queued during an outage.

Child runs are written through an ``MlflowClient`` with explicit run ids (Tune's
callbacks interleave many trials); the fluent API is only used, with the tracking
URI set explicitly, to log and register the best model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

from ..selection import direction
from .common import (BEST_TRIAL_TAG, DEFAULT_EXPERIMENT, DEFAULT_URI, METRICS_PER_BATCH, PARAMS_PER_BATCH,
                     PARENT_TAG, REGISTERED_TAG, ROLE_TAG, RUNNING, STATUS_TAG, TRIAL_ID_TAG, flatten,
                     jsonable, log, metric_entities, number, param_value, run_tags, short)
from .trials import TrialLogger, TrialRecord, best_and_missing, reconciled_end, result_rows
from .writer import REFUSED, Op, Ref, Writer, failure_kind

# How long the end of a search waits for an unreachable server to take what is queued.
WAIT_ENV, DEFAULT_FINAL_WAIT_S = "CXRTUNE_MLFLOW_WAIT_S", 15.0

_RUN_INACTIVE = re.compile(r"run \S+ must be in the 'active' state", re.I)
_ENV_KEYS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
             "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")

if TYPE_CHECKING:  # torch and MLflow's pyfunc are imported only when a model is logged
    from ..serving.model import ModelPackage, ModelSpec

RunLike = Union[None, str, Ref]


class Tracker:
    """MLflow tracking of one search (see the package docstring).

    ``uri``: ``sqlite:///mlflow.db`` (default, relative to the working directory),
    a ``file:`` URI or path, or ``http(s)://host:port`` of an ``mlflow server``.
    ``timeout_s``: of one request; ``retries``: immediate retries of a failed write;
    ``final_wait_s``: how long the end of the search waits for an unreachable server
    to take what is queued (default: ``$CXRTUNE_MLFLOW_WAIT_S``, else 15 s).
    """

    def __init__(self, uri: Optional[str] = None, experiment_name: str = DEFAULT_EXPERIMENT, *,
                 timeout_s: int = 5, artifact_timeout_s: int = 120, retries: int = 2,
                 final_wait_s: Optional[float] = None) -> None:
        self.uri = _absolute_local_uri(uri or DEFAULT_URI)
        self.experiment_name = experiment_name
        self.artifact_timeout_s = artifact_timeout_s
        self._writer = Writer(self.uri, retries=retries,
                              final_wait_s=(float(os.environ.get(WAIT_ENV, DEFAULT_FINAL_WAIT_S))
                                            if final_wait_s is None else final_wait_s),
                              ping=lambda: self._client.search_experiments(max_results=1),
                              fatal_reason=self._fatal_reason)
        self._client: Any = None
        self._closed = False
        self.registered: Optional[str] = None  # "name/version" of the model registered by this search
        self._exp = Ref("experiment")
        self._parent = Ref("parent run")
        self._children: dict[str, Ref] = {}  # trial id -> its run
        self._ended: set[Ref] = set()  # runs this driver ended (reconcile leaves them be)
        self._spool: Optional[Path] = None
        # Fail fast for the tracker's lifetime (read by mlflow.utils.rest_utils at each
        # request): the tracker retries and queues itself, MLflow's own retries with
        # backoff would stall the search for minutes. Ending a run on a tracking server
        # prints its URL on stdout, which is for the search's result (--json): not printed.
        self._env_before = {k: os.environ.get(k) for k in _ENV_KEYS}
        self._env_set = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s)),
                         "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
        os.environ.update(self._env_set)
        self._start()

    # ---------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        """Whether tracking is on (possibly queueing during an outage), not given up."""
        return self._client is not None and self._writer.enabled

    @property
    def experiment_id(self) -> Optional[str]:
        return self._exp.id

    @property
    def parent_id(self) -> Optional[str]:
        return self._parent.id

    @property
    def retries(self) -> int:
        return self._writer.retries

    @property
    def final_wait_s(self) -> float:
        return self._writer.final_wait_s

    @property
    def pending(self) -> int:
        """Writes waiting in the queue for the server."""
        return self._writer.pending

    @property
    def skipped(self) -> int:
        """MLflow writes not logged (so far): dropped, or still queued."""
        return self._writer.skipped

    def not_logged(self) -> dict[str, dict[str, int]]:
        """What was not logged (so far): ``{run label: {kind: count}}``, e.g.
        ``{"trial t_00001": {"run": 1, "params": 3, "metrics": 24, "end": 1}}``."""
        return self._writer.not_logged()

    def flush(self, wait_s: Optional[float] = None) -> bool:
        """Send what is queued, waiting for the server at most ``wait_s`` seconds
        (default ``final_wait_s``, shared by every call at the end of the search).
        True when nothing is left."""
        return self._writer.flush(wait_s)

    def poll(self) -> None:
        """Try to send the queue if its pause is over (called at each trial event)."""
        self._writer.poll()

    def _write(self, op: Op) -> Any:
        """Do ``op`` now (retrying briefly) or queue it; never raises (``Writer.write``)."""
        return self._writer.write(op)

    def _fatal_reason(self, exc: BaseException) -> Optional[str]:
        """A run refused as inactive is a reason to give up when its whole experiment was
        deleted (every later write would be refused as well)."""
        if _RUN_INACTIVE.search(str(exc)) and self._experiment_deleted():
            return f"the experiment {self.experiment_name!r} was deleted"
        return None

    def _experiment_deleted(self) -> bool:
        try:
            return self._client.get_experiment(self._exp.id).lifecycle_stage == "deleted"
        except Exception as exc:  # noqa: BLE001
            return failure_kind(exc) == REFUSED  # gone for good

    # ---------------------------------------------------------- start

    def _start(self) -> None:
        """Make the client, then get or create the experiment (queued when the server
        is not answering yet)."""
        try:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:  # noqa: BLE001
            reason = f"MLflow cannot be used ({short(exc)})"
            self._writer.off(reason)
            log.warning("%s; tracking is OFF: nothing of this search will be logged to MLflow.", reason)
            return
        self._write(Op(f"get or create experiment {self.experiment_name!r}", self._experiment,
                       "experiment", "experiment", then=self._exp.setter(), creates=self._exp))

    def _experiment(self) -> str:
        c = self._client
        exp = c.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                return c.create_experiment(self.experiment_name)
            except Exception as exc:  # noqa: BLE001 - created concurrently by another driver
                exp = c.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise exc
        if exp.lifecycle_stage == "deleted":
            # At the start a deleted experiment of this name is brought back (the user
            # asked for it by name); deleted mid-search, the tracker gives up instead.
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _run_ref(self, run: RunLike) -> Ref:
        """The ref of a run given as None (the parent), an id or a ref."""
        if isinstance(run, Ref):
            return run
        if run is None or run == self._parent.id:
            return self._parent
        return Ref(f"run {run}", str(run))

    # ---------------------------------------------------------- parent run

    def start_parent(self, run_name: str, params: Optional[Mapping[str, Any]] = None,
                     tags: Optional[Mapping[str, Any]] = None, artifacts: Iterable[Path] = (),
                     existing_run_id: Optional[str] = None) -> Optional[str]:
        """Create the search's parent run, or reopen ``existing_run_id`` (on --resume);
        log params (nested dicts flattened with dots), tags and files/folders.
        Returns the run id, or None when it is not created yet (queued) or cannot be."""
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        logged: dict[str, str] = {}

        def open_parent() -> str:
            c = self._client
            if existing_run_id:
                run = self._existing_run(existing_run_id)
                if run is not None:
                    c.update_run(run.info.run_id, status="RUNNING")
                    logged.update(run.data.params)
                    if tags:
                        c.log_batch(run.info.run_id, tags=run_tags(tags))
                    log.info("MLflow: resuming parent run %s", run.info.run_id)
                    return run.info.run_id
                log.warning("MLflow: parent run %s was not found; starting a new parent run",
                            existing_run_id)
            return c.create_run(self._exp.id, run_name=run_name,
                                tags={ROLE_TAG: "search", **tags}).info.run_id

        self._write(Op("create the parent run", open_parent, self._parent.label, "run",
                       refs=(self._exp,), then=self._parent.setter(), creates=self._parent))
        self.log_params(self._parent, params or {}, logged)
        for path in artifacts:
            self.log_path(self._parent, Path(path))
        return self._parent.id

    def _existing_run(self, run_id: str) -> Any:
        """The run ``run_id``, or None when it does not exist (or was deleted)."""
        try:
            run = self._client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001
            if failure_kind(exc) == REFUSED:  # RESOURCE_DOES_NOT_EXIST
                return None
            raise
        return run if run.info.lifecycle_stage == "active" else None

    def end_parent(self, parent_id: Optional[str] = None, status: str = "FINISHED") -> None:
        """Terminate the parent run (FINISHED, FAILED or KILLED), after sending what is
        queued (waiting at most ``final_wait_s`` for an unreachable server)."""
        ref = self._run_ref(parent_id)
        self._write(Op(f"end the parent run as {status}",
                       lambda: self._client.set_terminated(ref.id, status=status), ref.label, "end",
                       refs=(ref,)))
        self.flush()

    def drop_orphan_children(self, trial_ids: Sequence[str], parent_id: Optional[str] = None) -> int:
        """Delete child runs whose trial is not among ``trial_ids``. A driver killed
        between creating a trial's run and saving the trial in Tune's state leaves such a
        run behind; the resumed search re-creates the trial under a new id. Returns how
        many were deleted (0 when this had to be queued)."""
        ref = self._run_ref(parent_id)
        keep = set(map(str, trial_ids))

        def drop() -> int:
            runs = self._client.search_runs([self._exp.id], filter_string=f"tags.`{PARENT_TAG}` = '{ref.id}'",
                                            max_results=10000)
            orphans = [r for r in runs if r.data.tags.get(TRIAL_ID_TAG) not in keep]
            for r in orphans:
                self._client.delete_run(r.info.run_id)
            if orphans:
                log.info("MLflow: deleted %d run(s) of trials lost when the earlier driver was killed",
                         len(orphans))
            return len(orphans)

        return self._write(Op("delete the runs of lost trials", drop, ref.label, "cleanup",
                              refs=(self._exp, ref))) or 0

    # ---------------------------------------------------------- small pieces

    def log_params(self, run: RunLike, params: Mapping[str, Any],
                   logged: Optional[dict[str, str]] = None) -> None:
        """Log flattened params, skipping those already logged with the same value
        (MLflow refuses to change a logged param: a changed one is warned about).
        ``logged``: what the run has (read from MLflow when None), updated."""
        flat = {k: param_value(v) for k, v in flatten(params).items()}
        if not flat:
            return
        ref = self._run_ref(run)

        def send() -> None:
            # What is new is decided when the write runs: the run may have been found
            # (a resumed search) after this write was queued.
            have = logged if logged is not None else dict(self._client.get_run(ref.id).data.params)
            changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
            if changed:
                log.warning("MLflow run %s already has params %s with other values; MLflow cannot "
                            "change a logged param, so the new values are not logged", ref.id,
                            ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
            self._send_params(ref.id, [(k, v) for k, v in flat.items() if k not in have], have)

        self._write(Op(f"log {len(flat)} params", send, ref.label, "params", n=len(flat), refs=(ref,)))

    def _send_params(self, run_id: str, new: Sequence[tuple[str, str]],
                     have: Optional[dict[str, str]] = None) -> None:
        """Log ``(key, value)`` params in batches MLflow takes; each batch sent is added
        to ``have``."""
        from mlflow.entities import Param

        for batch in _batches(new, PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=[Param(k, v) for k, v in batch])
            if have is not None:
                have.update(batch)

    def log_metrics(self, run: RunLike, metrics: Mapping[str, Any], step: int = 0,
                    timestamp_ms: Optional[int] = None) -> None:
        """Log the numeric values of ``metrics`` at ``step`` in batches. Each value gets
        its timestamp now: a write sent again after a timeout is the same metric, which
        MLflow keeps once."""
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = [(k, x, ts, int(step)) for k, v in metrics.items() if (x := number(v)) is not None]
        if not items:
            return
        ref = self._run_ref(run)
        for batch in _batches(items, METRICS_PER_BATCH):
            self._write(Op(f"log {len(batch)} metrics", lambda b=batch: self._client.log_batch(
                ref.id, metrics=metric_entities(b)), ref.label, "metrics", n=len(batch), refs=(ref,)))

    def set_tags(self, run: RunLike, tags: Mapping[str, Any],
                 metrics: Callable[[], Sequence[Any]] = list) -> None:
        """Set ``tags`` (and log ``metrics()``, worked out when the write runs)."""
        ref = self._run_ref(run)
        tags = {str(k): str(v) for k, v in tags.items()}
        self._write(Op(f"set tags {', '.join(sorted(tags))[:80]}",
                       lambda: self._client.log_batch(ref.id, metrics=list(metrics()), tags=run_tags(tags)),
                       ref.label, "tags", n=len(tags), refs=(ref,)))

    def end_run(self, run: RunLike, status: str) -> None:
        ref = self._run_ref(run)
        self._ended.discard(ref)
        self._write(Op(f"end the run of {ref.label} as {status}",
                       lambda: self._client.set_terminated(ref.id, status=status), ref.label, "end",
                       refs=(ref,), then=lambda _: self._ended.add(ref)))

    def reopen_run(self, run: RunLike) -> None:
        """Mark a run RUNNING again (a trial restarted after its worker died)."""
        ref = self._run_ref(run)
        self._ended.discard(ref)
        self._write(Op(f"mark the run of {ref.label} RUNNING", lambda: self._mark_running(ref.id), ref.label,
                       "tags", refs=(ref,)))

    def _mark_running(self, run_id: str) -> None:
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, STATUS_TAG, RUNNING)

    def log_text(self, run: RunLike, text: str, artifact_file: str) -> None:
        ref = self._run_ref(run)
        self._write(Op(f"log {artifact_file}", lambda: self._client.log_text(ref.id, text, artifact_file),
                       ref.label, "artifact", refs=(ref,)))

    def log_path(self, run: RunLike, path: Path, artifact_path: Optional[str] = None) -> None:
        """Log a file, or a folder's contents under ``artifact_path`` (default: its name)."""
        if not path.exists():
            log.warning("MLflow: %s does not exist; not logged as an artifact", path)
            return
        ref = self._run_ref(run)
        src = [Path(path)]

        def send() -> None:
            if src[0].is_dir():
                self._client.log_artifacts(ref.id, str(src[0]), artifact_path=artifact_path or path.name)
            else:
                self._client.log_artifact(ref.id, str(src[0]), artifact_path=artifact_path)

        def keep() -> None:  # the file may be a temporary one: queued, it is sent later
            src[0] = self._keep(src[0])

        self._write(Op(f"log {'folder' if path.is_dir() else 'file'} {path}", send, ref.label, "artifact",
                       refs=(ref,), keep=keep))

    def _spool_dir(self) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="cxrtune-mlflow-"))
        return self._spool

    def _keep(self, path: Path) -> Path:
        """A copy of ``path`` that lives as long as the tracker."""
        target = Path(tempfile.mkdtemp(dir=self._spool_dir())) / path.name
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return target

    # ---------------------------------------------------------- trials

    def trial_logger(self, metric: str = "val/f1_macro", mode: Optional[str] = None,
                     max_epochs: Optional[int] = None,
                     params_of: Optional[Callable[[dict], dict]] = None) -> TrialLogger:
        """A ``TrialLogger`` logging each trial as a nested child run of the parent run.
        ``params_of`` picks the params to log out of a trial's config (a module-level
        function: the logger is pickled with Tune's callbacks)."""
        return TrialLogger(self, metric=metric, mode=mode, max_epochs=max_epochs, params_of=params_of)

    def child_run(self, trial_id: str, name: Optional[str] = None,
                  on_found: Optional[Callable[[Any], None]] = None) -> Ref:
        """The run of trial ``trial_id`` under the parent: found again when it exists (a
        resumed search; marked RUNNING, ``on_found(run)`` is called) or created. The
        look-up happens when the write runs, so a run queued during an outage is still
        created once."""
        tid = str(trial_id)
        ref = self._children.get(tid)
        if ref is not None:
            return ref
        ref = self._children[tid] = Ref(f"trial {tid}")
        found: list[Any] = []

        def get_or_create() -> str:
            run = self._find_child_now(tid)
            if run is not None:
                self._mark_running(run.info.run_id)
                found[:] = [run]
                return run.info.run_id
            return self._create_child(tid, name)

        def then(run_id: str) -> None:
            ref.id = run_id
            if found and on_found is not None:
                on_found(found[0])

        self._write(Op(f"create the run of trial {tid}", get_or_create, ref.label, "run",
                       refs=(self._exp, self._parent), then=then, creates=ref))
        return ref

    def _create_child(self, trial_id: str, name: Optional[str]) -> str:
        """A new RUNNING run of trial ``trial_id`` under the parent; its id."""
        return self._client.create_run(self._exp.id, run_name=str(name or f"trial_{trial_id}"), tags={
            PARENT_TAG: self._parent.id, TRIAL_ID_TAG: trial_id, STATUS_TAG: RUNNING,
            ROLE_TAG: "trial"}).info.run_id

    def _find_child_now(self, trial_id: str, parent_id: Optional[str] = None) -> Any:
        """The child run of ``trial_id`` (raises when MLflow fails)."""
        parent = parent_id or self._parent.id
        flt = f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
        runs = self._client.search_runs([self._exp.id], filter_string=flt, max_results=1)
        return runs[0] if runs else None

    def find_child(self, trial_id: str, parent_id: Optional[str] = None) -> Any:
        """The child run of ``trial_id`` under the parent (None if none, or MLflow is down)."""
        if self._exp.id is None:
            return None
        return self._writer.read(f"look up the run of trial {trial_id}",
                                 lambda: self._find_child_now(str(trial_id), parent_id))

    def metric_history(self, run_id: str, key: str) -> list:
        """``get_metric_history`` (raises when MLflow fails)."""
        return self._client.get_metric_history(run_id, key)

    # ---------------------------------------------------------- after the search

    def reconcile(self, trials: Iterable[TrialRecord], metric: str = "val/f1_macro",
                  mode: Optional[str] = None, max_epochs: Optional[int] = None) -> None:
        """Make MLflow agree with what Tune knows of every trial (on resume and at the end
        of a search): a trial without a run gets one (params, every epoch's metrics from
        its result history, status); a run missing epochs gets them; a run left RUNNING
        is closed as its trial ended (FINISHED / FAILED), or as KILLED when the trial
        did not end; each such run is tagged ``cxrtune.reconciled``. One queued write per
        trial, sent after everything logged before it: nothing is logged twice."""
        mode = mode or direction(metric)
        for rec in trials:
            tid = str(rec.trial_id)
            ref = self._children.get(tid)
            if ref in self._ended and rec.state in ("TERMINATED", "ERROR"):
                continue  # logged live, start to end, by this driver
            if ref is None or ref.lost:
                ref = self._children[tid] = Ref(f"trial {tid}")

            def then(run_id: str, ref: Ref = ref) -> None:
                ref.id, ref.lost = run_id, False

            self._write(Op(f"reconcile the run of trial {tid}",
                           lambda rec=rec: self._reconcile_one(rec, metric, mode, max_epochs),
                           ref.label, "reconcile", refs=(self._exp, self._parent), then=then))

    def _reconcile_one(self, rec: TrialRecord, metric: str, mode: str,
                       max_epochs: Optional[int]) -> str:
        """Reconcile one trial (may be run again after a failure: it only adds what is
        missing). Returns its run id."""
        rows = result_rows(rec)
        run_id, have, steps, still_open = self._reconcile_run(rec, metric)
        params = [(k, param_value(v)) for k, v in flatten(rec.params).items() if k not in have]
        self._send_params(run_id, params)
        best, missing = best_and_missing(rows, steps, metric, mode)
        for batch in _batches(missing, METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=metric_entities(batch))
        if still_open:
            tags, extra, run_status = reconciled_end(rec, rows, best, max_epochs)
            self._client.log_batch(run_id, metrics=metric_entities(extra), tags=run_tags(tags))
            self._client.set_terminated(run_id, status=run_status)
        if missing or params or still_open:
            log.info("MLflow: reconciled trial %s (%d params, %d metric values%s)", rec.trial_id, len(params),
                     len(missing), ", run closed" if still_open else "")
        return run_id

    def _reconcile_run(self, rec: TrialRecord, metric: str) -> tuple[str, dict, set, bool]:
        """(run id, its params, the epochs its metric was logged at, whether it is
        RUNNING) of the trial's run; created when there is none."""
        tid = str(rec.trial_id)
        run = self._find_child_now(tid)
        if run is None:
            return self._create_child(tid, rec.name), {}, set(), True
        run_id = run.info.run_id
        steps = {m.step for m in self._client.get_metric_history(run_id, metric)}
        return run_id, dict(run.data.params), steps, run.info.status == "RUNNING"

    # ---------------------------------------------------------- the best trial

    def log_best(self, parent_id: Optional[str], best_trial_id: str, best_config: Mapping[str, Any],
                 best_metrics: Mapping[str, Any], test_metrics: Mapping[str, Any], confusion: Any,
                 class_names: Sequence[str], checkpoint_dir: Optional[Path], model: Optional["ModelPackage"],
                 register_name: Optional[str] = None) -> Optional[str]:
        """Log the best trial on the parent run: ``best/`` params and metrics, ``test/``
        metrics, the confusion matrix (JSON + PNG), the checkpoint folder under
        ``best_checkpoint/``; and ``model`` (a ``serving.model`` package: network and spec),
        its preprocessing as ``preprocessing.json`` and the model itself as an MLflow pyfunc
        model named "model" in the search's experiment that applies that preprocessing
        (registered as ``register_name`` when given). Returns the model URI
        (``models:/<id>``), or None when it was not logged (yet: during an outage it is
        queued)."""
        ref = self._run_ref(parent_id)
        self.log_params(ref, {f"best/{k}": v for k, v in flatten(best_config).items()})
        metrics = {(k if k.startswith("best/") else f"best/{k}"): v for k, v in best_metrics.items()}
        metrics.update({(k if k.startswith("test/") else f"test/{k}"): v
                        for k, v in test_metrics.items()})
        self.log_metrics(ref, metrics)
        self.set_tags(ref, {BEST_TRIAL_TAG: best_trial_id})
        self._tag_best_child(str(best_trial_id), ref)
        # Files live as long as the tracker: a write queued during an outage sends them later.
        tmpdir = Path(tempfile.mkdtemp(dir=self._spool_dir()))
        if confusion is not None:
            self._log_confusion(ref, confusion, class_names, tmpdir)
        if checkpoint_dir is not None:
            self.log_path(ref, Path(checkpoint_dir), artifact_path="best_checkpoint")
        if model is None:
            return None
        prep_file = tmpdir / "preprocessing.json"
        prep_file.write_text(json.dumps(jsonable(model.spec.preprocessing.to_dict()), indent=2))
        self.log_path(ref, prep_file)
        artifacts = model.write(tmpdir / "model")
        model_ref = Ref("the best model")
        self._write(Op("log the best model", lambda: self._log_model(ref.id, model.spec, artifacts),
                       ref.label, "model", refs=(self._exp, ref), then=model_ref.setter(),
                       creates=model_ref))
        if register_name:
            self._write(Op(f"register the model as {register_name!r}",
                           lambda: self._register(model_ref.id, register_name, ref.id),
                           ref.label, "register", refs=(model_ref, ref)))
        return model_ref.id

    def log_report(self, parent_id: Optional[str], best_trial_id: Optional[str], bundle: Path,
                   trial_files: Sequence[str] = (), intervals: Optional[Mapping[str, Any]] = None) -> None:
        """The report bundle (figures, report.json, report.html) on the parent run under
        ``report/``; ``trial_files`` of it on the best trial's run too; each test metric's
        interval as ``<metric>/ci95_low`` and ``/ci95_high`` metrics of the parent."""
        ref = self._run_ref(parent_id)
        self.log_path(ref, Path(bundle), artifact_path="report")
        bounds = {}
        for key, (low, high) in (intervals or {}).items():
            bounds.update({f"{key}/ci95_low": low, f"{key}/ci95_high": high})
        self.log_metrics(ref, bounds)
        files = [Path(bundle) / f for f in trial_files if (Path(bundle) / f).exists()]
        if best_trial_id is None or not files:
            return

        def send() -> None:
            run_id = self._child_run_id(str(best_trial_id), ref.id)
            for f in files:
                if run_id is not None:
                    self._client.log_artifact(run_id, str(f), artifact_path="report")

        self._write(Op(f"log the report's figures on the run of trial {best_trial_id}", send,
                       f"trial {best_trial_id}", "artifact", refs=(self._exp, ref)))

    def _child_run_id(self, trial_id: str, parent_id: str) -> Optional[str]:
        child = self._children.get(trial_id)
        if child is not None and child.id:
            return child.id
        run = self._find_child_now(trial_id, parent_id)
        return run.info.run_id if run is not None else None

    def _tag_best_child(self, trial_id: str, parent: Ref) -> None:
        def tag() -> None:
            run_id = self._child_run_id(trial_id, parent.id)
            if run_id is not None:
                self._client.set_tag(run_id, "cxrtune.best", "true")

        self._write(Op(f"tag the run of trial {trial_id} as the best", tag, f"trial {trial_id}", "tags",
                       refs=(self._exp, parent)))

    def _log_confusion(self, run: Ref, confusion: Any, class_names: Sequence[str],
                       tmpdir: Path) -> None:
        import numpy as np

        cm = np.asarray(confusion)
        names = [str(c) for c in class_names]
        js = tmpdir / "confusion_matrix.json"
        js.write_text(json.dumps({"class_names": names, "rows": "true class",
                                  "columns": "predicted class", "matrix": cm.tolist()}, indent=2))
        self.log_path(run, js)
        from ..report.figures import confusion_png

        try:
            png = confusion_png(cm, names, tmpdir / "confusion_matrix.png")
        except Exception as exc:  # noqa: BLE001 - a plot never stops the search
            log.warning("could not plot the confusion matrix (%s); only its JSON is logged", short(exc))
            return
        self.log_path(run, png)

    def _log_model(self, run_id: str, spec: "ModelSpec", artifacts: dict[str, str]) -> str:
        import mlflow.pyfunc
        from mlflow.models import Model

        from ..serving.model import pyfunc_log_arguments

        # The logged model is created here, in the search's experiment: left to itself,
        # log_model puts it in the fluent API's current experiment, "Default" (id 0),
        # since no run is active in the fluent API.
        c = self._client
        logged = c.create_logged_model(self._exp.id, name="model", source_run_id=run_id,
                                       params={k: str(v) for k, v in c.get_run(run_id).data.params.items()})
        with self._fluent():
            # Model.log (what mlflow.pyfunc.log_model calls) takes the run id, which links the
            # model to the parent run as its output; log_model itself would need an active run.
            info = Model.log(
                artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                # Given explicitly, so MLflow does not infer requirements (slow, needs the network).
                pip_requirements=_requirements(),
                **pyfunc_log_arguments(artifacts, spec),
            )
        return info.model_uri

    def _register(self, model_uri: str, name: str, run_id: str) -> str:
        import mlflow

        # register_model prints its own two lines; the log line below says the same
        with self._fluent(), contextlib.redirect_stderr(io.StringIO()):
            mv = mlflow.register_model(model_uri, name, await_registration_for=60)
        self.registered = f"{name}/{mv.version}"
        self._client.set_tag(run_id, REGISTERED_TAG, self.registered)
        log.info("MLflow: registered %s as model %r version %s", model_uri, name, mv.version)
        return str(mv.version)

    @contextlib.contextmanager
    def _fluent(self) -> Iterator[None]:
        """The fluent API pointed at this tracker's URI, with the artifact timeout."""
        with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(self.artifact_timeout_s)), using_tracking_uri(self.uri):
            yield

    # ---------------------------------------------------------- the rest

    def ui_command(self) -> str:
        """How to look at what was logged."""
        if urlparse(self.uri).scheme in ("http", "https"):
            return f"open {self.uri}"
        return f"mlflow ui --backend-store-uri {self.uri}"

    def close(self) -> None:
        """Send what is queued (waiting at most ``final_wait_s`` for the server), say
        exactly what was not logged, restore the HTTP settings. Idempotent."""
        if self._closed:
            return
        self._writer.close()
        self._closed = True
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        for k, v in self._env_before.items():
            if os.environ.get(k) == self._env_set.get(k):  # not changed since by someone else
                _put_env(k, v)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a Tracker holds a live MLflow connection and cannot be pickled; "
                        "create it in the driver process")


def _batches(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``n`` (MLflow's limits per request)."""
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _absolute_local_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``; a bare path -> ``file://`` URI."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return "sqlite:///" + str(Path(path).resolve())
        return uri
    scheme = urlparse(uri).scheme
    if (not scheme and not uri.startswith("databricks")) or len(scheme) == 1:  # a path
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _put_env(key: str, value: Optional[str]) -> None:
    """Set ``key`` to ``value``; None removes it."""
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for a moment (restored afterwards)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            _put_env(k, v)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for a moment (restored afterwards); the model
    registry follows it unless a registry URI of its own was set."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - private helper moved
        mlflow.set_tracking_uri(uri)
        yield
        return
    with _use_tracking_uri(uri):
        yield


def _requirements() -> list[str]:
    """Pinned versions, in this environment, of what the served model imports besides
    cxrtune itself (no inference, no network). cxrtune is not on a package index: it is
    installed where the model is served (``--env-manager local``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "torchvision", "numpy", "pandas", "opencv-python-headless", "pillow", "pydicom"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out
