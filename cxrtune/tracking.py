"""MLflow tracking of a search: one parent run, one nested child run per Tune trial.

This is the only module of cxrtune that imports MLflow (lazily: importing it costs
nothing). Tracking never stops a search: every MLflow call goes through one guard,
``Tracker._call``. When the server is unreachable at start, or stops answering
mid-search, the tracker logs ONE warning saying what will not be logged, turns into
a no-op and counts the calls it skipped (``skipped``; ``close()`` sums them up).
A call the server *rejects* (say, a param whose value changed) is skipped with a
warning and tracking stays on.

Child runs are written through an ``MlflowClient`` with explicit run ids (Tune's
callbacks interleave many trials); the fluent API is only used, with the tracking
URI set explicitly, to log and register the best model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "cxrtune"

# tags
TRIAL_ID_TAG = "cxrtune.trial_id"
STATUS_TAG = "cxrtune.status"
LAST_EPOCH_TAG = "cxrtune.last_epoch"
ERROR_TAG = "cxrtune.error"
ROLE_TAG = "cxrtune.role"
BEST_TRIAL_TAG = "cxrtune.best_trial_id"
REGISTERED_TAG = "cxrtune.registered_model"
PARENT_TAG = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID

COMPLETED, STOPPED_EARLY, FAILED, RUNNING = "completed", "stopped_early", "failed", "running"

METRIC_PREFIXES = ("train/", "val/", "time/")
METRIC_KEYS = ("lr", "best")
ERROR_CHARS = 500  # of a failed trial's error kept in the cxrtune.error tag

# MLflow limits (mlflow.utils.validation): params per batch, param value length.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000

# Error codes of requests the store answered but refused: skip that call, stay on.
_REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
             "INVALID_STATE", "BAD_REQUEST", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"}

_LIVE: list["weakref.ref[Tracker]"] = []  # open trackers, oldest first (see _TrialLogging.tracker)


# ------------------------------------------------------------------ helpers


def flatten(d: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``sep`` joins the keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def param_value(v: Any) -> str:
    """A param value as MLflow stores it: a string of at most 6000 characters."""
    if isinstance(v, (list, tuple)):
        v = list(v)
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, list) else str(v)
    return s if len(s) <= _MAX_PARAM_VALUE else s[:_MAX_PARAM_VALUE - 3] + "..."


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _jsonable(obj: Any) -> Any:
    """Plain JSON data (numpy scalars/arrays, tuples, Paths made plain)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


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


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means MLflow is unusable (unreachable, timing out, broken store)
    rather than one request refused or a local problem with what was logged."""
    code = getattr(exc, "error_code", None)
    if code in _REJECTED:
        return False
    mods = [type(e).__module__ for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    if any(m.split(".")[0] in ("mlflow", "requests", "urllib3", "sqlalchemy", "sqlite3") for m in mods):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def _short(exc: BaseException, n: int = 300) -> str:
    """A one-line reason; for connection failures just the socket error."""
    s = " ".join(f"{type(exc).__name__}: {exc}".split())
    m = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out[^'\")]*|Connection refused", s)
    if m and "Max retries exceeded" in s:
        return f"cannot connect: {m.group(0).strip()}"
    return s if len(s) <= n else s[:n] + "..."


# ------------------------------------------------------------------ tracker


class Tracker:
    """MLflow tracking of one search (see the module docstring).

    ``uri``: ``sqlite:///mlflow.db`` (default, relative to the working directory),
    a ``file:`` URI or path, or ``http(s)://host:port`` of an ``mlflow server``.
    """

    def __init__(self, uri: Optional[str] = None, experiment_name: str = DEFAULT_EXPERIMENT, *,
                 timeout_s: int = 5, artifact_timeout_s: int = 120) -> None:
        self.uri = _absolute_local_uri(uri or DEFAULT_URI)
        self.experiment_name = experiment_name
        self.experiment_id: Optional[str] = None
        self.parent_id: Optional[str] = None
        self.skipped = 0
        self.artifact_timeout_s = artifact_timeout_s
        self._client: Any = None
        self._enabled = False
        self._closed = False
        self._warned_rejected: set[str] = set()
        # Fail fast for the tracker's lifetime (read by mlflow.utils.rest_utils at each request).
        self._env_before = {k: os.environ.get(k) for k in _ENV_KEYS}
        self._env_set = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
        os.environ.update(self._env_set)
        self._start()
        _LIVE.append(weakref.ref(self))

    # ---------------------------------------------------------- the guard

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _call(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """Run one MLflow call; never raises. Off: counts it as skipped."""
        if not self._enabled:
            self.skipped += 1
            return default
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the search
            self.skipped += 1
            if _is_outage(exc):
                self._enabled = False
                log.warning(
                    "MLflow tracking at %s stopped working while trying to %s (%s); tracking is OFF "
                    "from now on: the remaining trials' params, metrics and statuses, the best model "
                    "and its registration will NOT be logged. The search goes on.",
                    self.uri, what, _short(exc))
            elif what not in self._warned_rejected:
                self._warned_rejected.add(what)
                log.warning("MLflow refused to %s (%s); skipped, tracking stays on.", what, _short(exc))
            else:
                log.debug("MLflow refused to %s: %s", what, exc)
            return default

    def _start(self) -> None:
        """Connect (quick probe for servers), then get or create the experiment."""
        try:
            from mlflow import MlflowClient
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow cannot be imported (%s); tracking is OFF: nothing of this search "
                        "will be logged to MLflow.", _short(exc))
            return
        try:
            client = MlflowClient(tracking_uri=self.uri)
            if urlparse(self.uri).scheme in ("http", "https"):
                client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow tracking at %s is unreachable (%s); tracking is OFF: no runs, params, "
                        "metrics, models or registry entries of this search will be logged. Start "
                        "the server (mlflow server ...) or point the tracking URI elsewhere.",
                        self.uri, _short(exc))
            return
        self._client = client
        self._enabled = True
        self.experiment_id = self._call(f"get or create experiment {self.experiment_name!r}",
                                        self._experiment)
        if self.experiment_id is None:
            self._enabled = False

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
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    # ---------------------------------------------------------- parent run

    def start_parent(self, run_name: str, params: Optional[Mapping[str, Any]] = None,
                     tags: Optional[Mapping[str, Any]] = None, artifacts: Iterable[Path] = (),
                     existing_run_id: Optional[str] = None) -> Optional[str]:
        """Create the search's parent run, or reopen ``existing_run_id`` (on --resume);
        log params (nested dicts flattened with dots), tags and files/folders.
        Returns the run id, or None when tracking is off."""
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        run_id, logged = None, None
        if existing_run_id:
            run = self._call(f"reopen parent run {existing_run_id}",
                             lambda: self._client.get_run(existing_run_id))
            if run is not None:
                run_id = run.info.run_id
                self._call("mark the parent run RUNNING",
                           lambda: self._client.update_run(run_id, status="RUNNING"))
                log.info("MLflow: resuming parent run %s", run_id)
            elif self._enabled:
                log.warning("MLflow: parent run %s was not found; starting a new parent run",
                            existing_run_id)
        if run_id is None:
            run = self._call("create the parent run", lambda: self._client.create_run(
                self.experiment_id, run_name=run_name, tags={ROLE_TAG: "search", **tags}))
            if run is None:
                return None
            run_id, logged = run.info.run_id, {}
        elif tags:
            self._set_tags(run_id, tags)
        self.parent_id = run_id
        self.log_params(run_id, params or {}, logged)
        for path in artifacts:
            self.log_path(run_id, Path(path))
        return run_id

    def end_parent(self, parent_id: Optional[str] = None, status: str = "FINISHED") -> None:
        """Terminate the parent run (FINISHED, FAILED or KILLED)."""
        run_id = parent_id or self.parent_id
        if run_id is not None or not self._enabled:
            self._call(f"end the parent run as {status}",
                       lambda: self._client.set_terminated(run_id, status=status))

    def drop_orphan_children(self, trial_ids: Sequence[str], parent_id: Optional[str] = None) -> int:
        """Delete child runs whose trial is not among ``trial_ids``. A driver killed
        between creating a trial's run and saving the trial in Tune's state leaves such a
        run behind; the resumed search re-creates the trial under a new id. Returns how
        many were deleted."""
        parent = parent_id or self.parent_id
        if parent is None:
            return 0
        runs = self._call("list the child runs", lambda: self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
            max_results=10000), default=[]) or []
        keep = set(map(str, trial_ids))
        orphans = [r for r in runs if r.data.tags.get(TRIAL_ID_TAG) not in keep]
        for r in orphans:
            self._call("delete an orphaned trial run", lambda r=r: self._client.delete_run(r.info.run_id))
        if orphans:
            log.info("MLflow: deleted %d run(s) of trials lost when the earlier driver was killed",
                     len(orphans))
        return len(orphans)

    # ---------------------------------------------------------- small pieces

    def log_params(self, run_id: Optional[str], params: Mapping[str, Any],
                   logged: Optional[dict[str, str]] = None) -> None:
        """Log flattened params, skipping those already logged with the same value
        (MLflow refuses to change a logged param: a changed one is warned about)."""
        flat = {k: param_value(v) for k, v in flatten(params).items()}
        if not flat:
            return
        if run_id is None:
            self._call("log params", lambda: None)
            return
        if logged is None:
            run = self._call("read the run's params", lambda: self._client.get_run(run_id))
            if run is None:
                return
            logged = dict(run.data.params)
        changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("MLflow run %s already has params %s with other values; MLflow cannot "
                        "change a logged param, so the new values are not logged", run_id,
                        ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
        new = {k: v for k, v in flat.items() if k not in logged}
        if not new:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            batch = items[i:i + _PARAMS_PER_BATCH]
            self._call("log params", lambda b=batch: self._client.log_batch(run_id, params=b))
        logged.update(new)

    def log_metrics(self, run_id: Optional[str], metrics: Mapping[str, Any],
                    step: int = 0) -> None:
        """Log the numeric values of ``metrics`` at ``step`` in batches."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, x, ts, int(step)) for k, v in metrics.items()
                 if (x := _number(v)) is not None]
        if not items:
            return
        if run_id is None:
            self._call("log metrics", lambda: None)
            return
        for i in range(0, len(items), _METRICS_PER_BATCH):
            batch = items[i:i + _METRICS_PER_BATCH]
            self._call("log metrics", lambda b=batch: self._client.log_batch(run_id, metrics=b))

    def _set_tags(self, run_id: Optional[str], tags: Mapping[str, Any],
                  metrics: Sequence[Any] = ()) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self._call("set tags", lambda: self._client.log_batch(run_id, metrics=list(metrics),
                                                              tags=items))

    def log_path(self, run_id: Optional[str], path: Path, artifact_path: Optional[str] = None) -> None:
        """Log a file, or a folder's contents under ``artifact_path`` (default: its name)."""
        if not path.exists():
            log.warning("MLflow: %s does not exist; not logged as an artifact", path)
            return
        if path.is_dir():
            self._call(f"log folder {path}", lambda: self._client.log_artifacts(
                run_id, str(path), artifact_path=artifact_path or path.name))
        else:
            self._call(f"log file {path}", lambda: self._client.log_artifact(
                run_id, str(path), artifact_path=artifact_path))

    # ---------------------------------------------------------- trials

    def callback(self, metric: str = "val/f1_macro", mode: str = "max",
                 max_epochs: Optional[int] = None, parent_run_id: Optional[str] = None,
                 params_of: Optional[Callable[[dict], dict]] = None) -> Any:
        """A ``ray.tune.Callback`` that logs each trial as a nested child run of the parent
        run (``parent_run_id``, default: the one ``start_parent`` returned), see
        ``MlflowTrialCallback``. ``params_of`` picks the params to log out of a trial's
        config (a module-level function: the callback is pickled). Imports Ray; importing
        this module does not."""
        return _callback_class()(self, metric=metric, mode=mode, max_epochs=max_epochs,
                                 parent_run_id=parent_run_id, params_of=params_of)

    def find_child(self, trial_id: str, parent_id: Optional[str] = None) -> Any:
        """The child run of ``trial_id`` under the parent (None if none or off)."""
        parent = parent_id or self.parent_id
        flt = f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
        runs = self._call(f"look up the run of trial {trial_id}", lambda: self._client.search_runs(
            [self.experiment_id], filter_string=flt, max_results=1), default=None)
        return runs[0] if runs else None

    # ---------------------------------------------------------- the best trial

    def log_best(self, parent_id: Optional[str], best_trial_id: str, best_config: Mapping[str, Any],
                 best_metrics: Mapping[str, Any], test_metrics: Mapping[str, Any], confusion: Any,
                 class_names: Sequence[str], checkpoint_dir: Optional[Path], model: Any,
                 preprocessing: Mapping[str, Any], register_name: Optional[str] = None
                 ) -> Optional[str]:
        """Log the best trial on the parent run: ``best/`` params and metrics, ``test/``
        metrics, the confusion matrix (JSON + PNG), the checkpoint folder under
        ``best_checkpoint/``, ``preprocessing.json``, the model as an MLflow PyTorch model
        named "model" (registered as ``register_name`` when given). Returns the model URI
        (``models:/<id>``), or None when it could not be logged."""
        run_id = parent_id or self.parent_id
        if run_id is None:
            self.skipped += 1
            return None
        self.log_params(run_id, {f"best/{k}": v for k, v in flatten(best_config).items()})
        metrics = {(k if k.startswith("best/") else f"best/{k}"): v for k, v in best_metrics.items()}
        metrics.update({(k if k.startswith("test/") else f"test/{k}"): v
                        for k, v in test_metrics.items()})
        self.log_metrics(run_id, metrics)
        self._set_tags(run_id, {BEST_TRIAL_TAG: best_trial_id})
        child = self.find_child(best_trial_id, run_id) if self._enabled else None
        if child is not None:
            self._set_tags(child.info.run_id, {"cxrtune.best": "true"})
        prep = _jsonable(dict(preprocessing))
        with tempfile.TemporaryDirectory(prefix="cxrtune-mlflow-") as tmp:
            tmpdir = Path(tmp)
            if confusion is not None:
                self._log_confusion(run_id, confusion, class_names, tmpdir)
            prep_file = tmpdir / "preprocessing.json"
            prep_file.write_text(json.dumps(prep, indent=2))
            self.log_path(run_id, prep_file)
            if checkpoint_dir is not None:
                self.log_path(run_id, Path(checkpoint_dir), artifact_path="best_checkpoint")
            if model is None:
                return None
            with self._env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(self.artifact_timeout_s)):
                model_uri = self._call("log the best model",
                                       lambda: self._log_model(run_id, model, prep, prep_file))
                if model_uri and register_name:
                    version = self._call(f"register the model as {register_name!r}",
                                         lambda: self._register(model_uri, register_name))
                    if version is not None:
                        self._set_tags(run_id, {REGISTERED_TAG: f"{register_name}/{version}"})
                        log.info("MLflow: registered %s as model %r version %s", model_uri,
                                 register_name, version)
        return model_uri

    def _log_confusion(self, run_id: str, confusion: Any, class_names: Sequence[str],
                       tmpdir: Path) -> None:
        import numpy as np

        cm = np.asarray(confusion)
        names = [str(c) for c in class_names]
        js = tmpdir / "confusion_matrix.json"
        js.write_text(json.dumps({"class_names": names, "rows": "true class",
                                  "columns": "predicted class", "matrix": cm.tolist()}, indent=2))
        self.log_path(run_id, js)
        try:
            png = _confusion_png(cm, names, tmpdir / "confusion_matrix.png")
        except Exception as exc:  # noqa: BLE001 - a plot never stops the search
            log.warning("could not plot the confusion matrix (%s); only its JSON is logged", _short(exc))
            return
        self.log_path(run_id, png)

    def _log_model(self, run_id: str, model: Any, prep: dict[str, Any], prep_file: Path) -> str:
        import copy

        import mlflow.pytorch

        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()
        model.eval()
        with _tracking_uri(self.uri):
            info = mlflow.pytorch.log_model(
                model, name="model", run_id=run_id,
                # Given explicitly, so MLflow does not infer requirements (slow, needs the network).
                pip_requirements=_requirements(),
                serialization_format="pickle",  # 3.17's default 'pt2' needs an input example
                metadata={"preprocessing": prep},
                extra_files=[str(prep_file)],
            )
        return info.model_uri

    def _register(self, model_uri: str, name: str) -> str:
        import mlflow

        with _tracking_uri(self.uri):
            mv = mlflow.register_model(model_uri, name, await_registration_for=60)
        return str(mv.version)

    # ---------------------------------------------------------- the rest

    def ui_command(self) -> str:
        """How to look at what was logged."""
        if urlparse(self.uri).scheme in ("http", "https"):
            return f"open {self.uri}"
        return f"mlflow ui --backend-store-uri {self.uri}"

    def close(self) -> None:
        """Say how many calls were not logged; restore the HTTP settings. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE[:] = [r for r in _LIVE if r() is not None and r() is not self]
        if self.skipped:
            log.warning("%d MLflow calls were not logged (tracking at %s was off or failing).",
                        self.skipped, self.uri)
        for k, v in self._env_before.items():
            if os.environ.get(k) == self._env_set.get(k):
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a Tracker holds a live MLflow connection and cannot be pickled; "
                        "create it in the driver process")

    @contextlib.contextmanager
    def _env(self, **values: str):
        before = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_ENV_KEYS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """Point the fluent API at ``uri`` for a moment (restored afterwards)."""
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
    """Pinned torch/torchvision/numpy of this environment (no inference, no network)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "torchvision", "numpy"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out


def _confusion_png(cm: Any, names: Sequence[str], path: Path) -> Path:
    """Plot ``cm`` (rows: true class) with counts and row-normalised colours."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    side = max(3.5, 0.9 * n + 2)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = cm.sum(axis=1, keepdims=True).astype(float)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]:g}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title("confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------ the Tune callback


def _epoch_of(result: Mapping[str, Any]) -> float:
    """The engine's epoch of a Tune result (Tune's iteration count when it has none)."""
    epoch = _number(result.get("epoch"))
    return epoch if epoch is not None else (_number(result.get("training_iteration")) or 0.0)


class _TrialLogging:
    """What the Tune callback does; Ray-free, mixed into the ray.tune.Callback subclass.

    Driver-side, for each trial: ``on_trial_start`` gets or creates one child run
    (tags ``cxrtune.trial_id``, ``mlflow.parentRunId``; an existing one is found again
    on a resumed search) and logs ``trial.config``; ``on_trial_result`` logs the
    ``train/``, ``val/``, ``time/``, ``lr`` and ``best`` metrics at step ``epoch``;
    ``on_trial_complete`` tags ``cxrtune.status`` completed (reached ``max_epochs``,
    or ended by itself: early stopping) or stopped_early (stopped by the scheduler)
    and ends the run FINISHED; ``on_trial_error`` tags failed + the error and ends it
    FAILED.
    """

    def __init__(self, tracker: Tracker, metric: str = "val/f1_macro", mode: str = "max",
                 max_epochs: Optional[int] = None, parent_run_id: Optional[str] = None,
                 params_of: Optional[Callable[[dict], dict]] = None) -> None:
        self._tracker: Optional[Tracker] = tracker
        self.params_of = params_of or dict
        self._parent_run_id = parent_run_id
        self._key = (tracker.uri, tracker.experiment_name)
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._params: dict[str, dict[str, str]] = {}  # run id -> logged params
        self._last: dict[str, tuple[int, bool]] = {}  # trial id -> (last epoch, done flag)
        self._best: dict[str, float] = {}  # trial id -> best value of `metric` seen
        self._found: set[str] = set()  # trial ids whose run existed already (resumed search)

    # Tuner pickles its RunConfig (and so this callback) into tuner.pkl; Tuner.restore
    # brings it back: the live Tracker of the same URI and experiment is then used.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tracker"] = None
        state["_params"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def tracker(self) -> Optional[Tracker]:
        if self._tracker is None or self._tracker._closed:
            live = [t for r in _LIVE if (t := r()) is not None and not t._closed
                    and (t.uri, t.experiment_name) == self._key]
            self._tracker = live[-1] if live else None
        return self._tracker

    def _parent(self) -> Optional[str]:
        t = self.tracker
        if t is None:
            return None
        return t.parent_id or self._parent_run_id

    # ------------------------------------------------------ runs

    def _run_for(self, trial: Any, create: bool = True) -> Optional[str]:
        tid = str(trial.trial_id)
        if tid in self._runs:
            return self._runs[tid]
        t, parent = self.tracker, self._parent()
        if t is None or parent is None or not t.enabled:
            return None
        run = t.find_child(tid, parent)
        if run is not None:
            run_id = run.info.run_id
            self._found.add(tid)
            self._params[run_id] = dict(run.data.params)
            history = t._call("read the trial's metric history",
                              lambda: t._client.get_metric_history(run_id, self.metric), default=[])
            for m in history or []:
                self._see_best(tid, m.value)
        elif create:
            name = getattr(trial, "custom_trial_name", None) or f"trial_{tid}"
            run = t._call(f"create the run of trial {tid}", lambda: t._client.create_run(
                t.experiment_id, run_name=str(name),
                tags={PARENT_TAG: parent, TRIAL_ID_TAG: tid, STATUS_TAG: RUNNING,
                      ROLE_TAG: "trial"}))
            if run is None:
                return None
            run_id = run.info.run_id
            self._params[run_id] = {}
        else:
            return None
        self._runs[tid] = run_id
        return run_id

    def _see_best(self, tid: str, value: Optional[float]) -> None:
        if value is None or math.isnan(value):
            return
        old = self._best.get(tid)
        if old is None or (value > old if self.mode == "max" else value < old):
            self._best[tid] = value

    # ------------------------------------------------------ hooks

    def _active(self) -> Optional[Tracker]:
        """The tracker to log to, or None (a call on a tracker that is off counts as skipped)."""
        t = self.tracker
        if t is not None and not t.enabled:
            t.skipped += 1
            return None
        return t

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self._active()
        if t is None:
            return
        tid = str(trial.trial_id)
        known = tid in self._runs
        run_id = self._run_for(trial)
        if run_id is None:
            return
        if known or tid in self._found:  # reopened: a restarted or resumed trial
            t._call("mark the trial's run RUNNING", lambda: t._client.update_run(run_id, status="RUNNING"))
            t._set_tags(run_id, {STATUS_TAG: RUNNING})
        t.log_params(run_id, self.params_of(dict(getattr(trial, "config", None) or {})),
                     self._params.setdefault(run_id, {}))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        t = self.tracker
        if t is None:
            return
        tid = str(trial.trial_id)
        flat = flatten(result, sep="/")
        epoch = _epoch_of(flat)
        # Tune sets done=True on the result it passes here when the scheduler (ASHA) or a
        # stopper stops the trial; a trial that ends by itself is done after its last result.
        self._last[tid] = (int(epoch), bool(flat.get("done", False)))
        self._see_best(tid, _number(flat.get(self.metric)))
        metrics = {k: v for k, v in flat.items()
                   if k.startswith(METRIC_PREFIXES) or k in METRIC_KEYS}
        if self._active() is None:
            return
        run_id = self._run_for(trial)
        if run_id is not None:
            t.log_metrics(run_id, metrics, step=int(epoch))

    def _finish(self, trial: Any, status_tag: str, run_status: str, extra_tags: Mapping[str, str],
                epoch: int) -> None:
        t = self._active()
        if t is None:
            return
        run_id = self._run_for(trial)
        if run_id is None:
            return
        tid = str(trial.trial_id)
        from mlflow.entities import Metric

        metrics = []
        if tid in self._best:
            metrics.append(Metric(f"best/{self.metric}", self._best[tid], int(time.time() * 1000), epoch))
        t._set_tags(run_id, {STATUS_TAG: status_tag, LAST_EPOCH_TAG: str(epoch), **extra_tags}, metrics)
        t._call(f"end the run of trial {tid}",
                lambda: t._client.set_terminated(run_id, status=run_status))

    def _last_epoch(self, trial: Any) -> tuple[int, Optional[bool]]:
        tid = str(trial.trial_id)
        if tid in self._last:
            epoch, done = self._last[tid]
            return epoch, done
        return int(_epoch_of(getattr(trial, "last_result", None) or {})), None  # no result seen by this driver: the done flag is unknown

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch, done = self._last_epoch(trial)
        reached = self.max_epochs is not None and epoch >= self.max_epochs
        if self.max_epochs is None:
            completed = not done
        else:
            completed = reached or done is False
        self._finish(trial, COMPLETED if completed else STOPPED_EARLY, "FINISHED", {}, epoch)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = _error_text(trial, info)
        epoch, _ = self._last_epoch(trial)
        self._finish(trial, FAILED, "FAILED", {ERROR_TAG: _clip_error(text)}, epoch)
        t = self.tracker
        run_id = self._runs.get(str(trial.trial_id))
        if t is not None and run_id is not None and text and len(text) > ERROR_CHARS:
            t._call("log the trial's error", lambda: t._client.log_text(run_id, text, "error.txt"))


def _error_text(trial: Any, info: Mapping[str, Any]) -> str:
    """The trial's error: its error file (Tune writes it before calling on_trial_error),
    else ``trial.get_error()``, else an ``error`` Tune might pass."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            text = Path(path).read_text(errors="replace").strip()
            if text:
                return text
        except OSError:
            pass
    get_error = getattr(trial, "get_error", None)
    if callable(get_error):
        try:
            err = get_error()
        except Exception:  # noqa: BLE001 - storage may be gone
            err = None
        if err:
            return str(err).strip()
    if info.get("error") is not None:
        return repr(info["error"])
    return "unknown error (Tune gave no error text)"


def _clip_error(text: str, n: int = ERROR_CHARS) -> str:
    """``text`` in at most ``n`` characters: its start and its end (where the exception is)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()  # Ray colours its traceback header
    if len(text) <= n:
        return text
    head = n // 5
    return text[:head] + "\n...\n" + text[-(n - head - 5):]


_CALLBACK_CLS: Optional[type] = None


def _callback_class() -> type:
    """``MlflowTrialCallback``: ``_TrialLogging`` as a ``ray.tune.Callback``. Defined on
    first use (importing Ray) and published as a module attribute, so pickle finds it
    by name (Tuner pickles its callbacks)."""
    global _CALLBACK_CLS
    if _CALLBACK_CLS is None:
        from ray.tune import Callback

        class MlflowTrialCallback(_TrialLogging, Callback):
            __doc__ = _TrialLogging.__doc__

        MlflowTrialCallback.__module__ = __name__
        MlflowTrialCallback.__qualname__ = "MlflowTrialCallback"
        _CALLBACK_CLS = MlflowTrialCallback
        globals()["MlflowTrialCallback"] = MlflowTrialCallback
    return _CALLBACK_CLS


def __getattr__(name: str) -> Any:  # PEP 562: `from cxrtune.tracking import MlflowTrialCallback`
    if name == "MlflowTrialCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Tracker", "DEFAULT_URI", "DEFAULT_EXPERIMENT", "flatten", "param_value",
           "TRIAL_ID_TAG", "STATUS_TAG", "LAST_EPOCH_TAG", "ERROR_TAG", "COMPLETED",
           "STOPPED_EARLY", "FAILED"]
