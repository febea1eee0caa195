"""MLflow tracking of a search: one parent run, one nested child run per Tune trial.

This is the only module of cxrtune that imports MLflow (lazily: importing it costs
nothing), and it imports no Ray: ``TrialLogger`` holds what the driver-side Tune
callback does, and search.py's small ``ray.tune.Callback`` delegates to it.

Tracking never stops a search, and it recovers from outages. Every MLflow write is an
operation (``_Op``) run through one place, ``Tracker._write``:

* a write that fails for a reason a retry can fix (connection refused, a timeout, a
  5xx) is retried a couple of times at once (``retries``, short sleeps);
* if it still fails, it is QUEUED, and so is every later write (in order, so a run's
  creation, params, metrics, tags and termination keep their order); the queue is
  sent when the server answers again: tried at later writes and trial events (with a
  growing pause between tries), and at the end of the search for up to
  ``final_wait_s``. Runs created while the server was down get their id when they are
  created; writes that need it wait for it (``_Ref``);
* a write the server *refuses* (a changed param, an invalid value) is dropped with a
  warning and tracking stays on;
* errors a retry cannot fix (bad credentials, the experiment deleted) make the tracker
  give up: nothing more is sent.

``close()`` says exactly what was not logged (which runs, how many params, metric
values, tags), and ``not_logged()`` returns it. Reads (look-ups) are never queued: when
the server is down they return nothing, and the writes that depend on them look up
again when they run.

Child runs are written through an ``MlflowClient`` with explicit run ids (Tune's
callbacks interleave many trials); the fluent API is only used, with the tracking
URI set explicitly, to log and register the best model.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

from .selection import BestSoFar, direction

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "cxrtune"
# How long the end of a search waits for an unreachable server to take what is queued.
WAIT_ENV, DEFAULT_FINAL_WAIT_S = "CXRTUNE_MLFLOW_WAIT_S", 15.0

# tags
TRIAL_ID_TAG = "cxrtune.trial_id"
STATUS_TAG = "cxrtune.status"
LAST_EPOCH_TAG = "cxrtune.last_epoch"
ERROR_TAG = "cxrtune.error"
ROLE_TAG = "cxrtune.role"
BEST_TRIAL_TAG = "cxrtune.best_trial_id"
REGISTERED_TAG = "cxrtune.registered_model"
RECONCILED_TAG = "cxrtune.reconciled"  # written after the fact from Tune's results (reconcile)
PARENT_TAG = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID

COMPLETED, STOPPED_EARLY, FAILED, RUNNING = "completed", "stopped_early", "failed", "running"
KILLED, NOT_STARTED = "killed", "not_started"

METRIC_PREFIXES = ("train/", "val/", "time/")
METRIC_KEYS = ("lr", "best")
ERROR_CHARS = 500  # of a failed trial's error kept in the cxrtune.error tag

# MLflow limits (mlflow.utils.validation): params per batch, param value length.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000

# Outcomes of one try of a write, and what kind of failure an exception is.
DONE, WAIT, LOST = "done", "wait", "lost"
TRANSIENT, REFUSED, FATAL = "transient", "refused", "fatal"

# Failures a retry can fix: the server is down, overloaded or timed out (5xx, 429).
# MLflow reports a refused connection or a timeout as INTERNAL_ERROR too.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED",
                    "DATA_LOSS"}
# Failures no retry can fix, for any later call either: give up.
_FATAL_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"}
_EXPERIMENT_GONE = re.compile(r"experiment \S+ must be in the 'active' state|no experiment with id", re.I)
_RUN_INACTIVE = re.compile(r"run \S+ must be in the 'active' state", re.I)

_RETRY_SLEEPS_S = (0.2, 0.8)  # inline retries of a failed write: the search waits for these
_FIRST_PAUSE_S, _MAX_PAUSE_S = 1.0, 30.0  # between tries to send the queue during an outage
_POISON_TRIES = 3  # a queued write failing this often while the server answers is dropped
_MAX_QUEUE = 200_000  # writes held during an outage; beyond, new ones are dropped (and counted)

# How the end-of-search report names what was not logged.
_KIND_WORDS = {"experiment": "the experiment", "run": "the run itself", "params": "params",
               "metrics": "metric values", "tags": "tags", "end": "its end status",
               "artifact": "artifacts", "model": "the model", "register": "the model registration",
               "cleanup": "the clean-up of orphaned runs", "reconcile": "its reconciliation"}
_COUNTED = {"params", "metrics", "tags", "artifact"}  # kinds reported with a number


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


def failure_kind(exc: BaseException) -> str:
    """TRANSIENT (retry later), REFUSED (drop this call) or FATAL (give up) for an
    exception raised by an MLflow call."""
    code = getattr(exc, "error_code", None)
    if code in _FATAL_CODES or _EXPERIMENT_GONE.search(str(exc)):
        return FATAL
    if code is not None:
        return TRANSIENT if code in _TRANSIENT_CODES else REFUSED
    mods = [type(e).__module__ for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    if any(m.split(".")[0] in ("requests", "urllib3", "sqlalchemy", "sqlite3", "http") for m in mods):
        return TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TRANSIENT
    return REFUSED  # a local problem with what was logged (a missing file, a bad value)


def _short(exc: BaseException, n: int = 300) -> str:
    """A one-line reason; for connection failures just the socket error."""
    s = " ".join(f"{type(exc).__name__}: {exc}".split())
    m = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out[^'\")]*|Connection refused", s)
    if m and "Max retries exceeded" in s:
        return f"cannot connect: {m.group(0).strip()}"
    return s if len(s) <= n else s[:n] + "..."


# ------------------------------------------------------------------ queued writes


class _Ref:
    """The id of something MLflow creates (the experiment, a run), known once it is
    created: writes queued before that use it when they run."""

    __slots__ = ("label", "id", "lost")

    def __init__(self, label: str, id: Optional[str] = None) -> None:
        self.label, self.id, self.lost = label, id, False

    def __repr__(self) -> str:
        return f"_Ref({self.label!r}, {self.id!r})"


@dataclass(eq=False)
class _Op:
    """One MLflow write. ``fn`` does it (and may be run again: writes are idempotent or
    look up before they create); ``then`` gets its result; ``refs`` must be known first;
    ``creates`` is lost with it when it cannot be done; ``keep`` secures its inputs
    (files in a temporary folder) when it has to wait in the queue."""

    what: str
    fn: Callable[[], Any]
    label: str
    kind: str
    n: int = 1
    refs: tuple = ()
    then: Optional[Callable[[Any], None]] = None
    creates: Optional[_Ref] = None
    keep: Optional[Callable[[], None]] = None
    result: Any = None
    error: Optional[BaseException] = None
    failures: int = 0


# ------------------------------------------------------------------ tracker


RunLike = Union[None, str, _Ref]


class Tracker:
    """MLflow tracking of one search (see the module docstring).

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
        self.retries = min(retries, len(_RETRY_SLEEPS_S))
        self.final_wait_s = (float(os.environ.get(WAIT_ENV, DEFAULT_FINAL_WAIT_S)) if final_wait_s is None
                             else final_wait_s)
        self._client: Any = None
        self._closed = False
        self.registered: Optional[str] = None  # "name/version" of the model registered by this search
        self._exp = _Ref("experiment")
        self._parent = _Ref("parent run")
        self._children: dict[str, _Ref] = {}  # trial id -> its run
        self._ended: set[_Ref] = set()  # runs this driver ended (reconcile leaves them be)
        self._queue: collections.deque[_Op] = collections.deque()
        self._pause_s = _FIRST_PAUSE_S
        self._next_try = 0.0
        self._outage: Optional[str] = None  # why the queue is held, while it is
        self._sent = 0  # queued writes sent since the outage began
        self._gave_up: Optional[str] = None
        self._fatal_why: Optional[str] = None  # said instead of the exception, when known
        self._final_deadline: Optional[float] = None
        self._lost: dict[str, collections.Counter] = {}  # label -> kind -> count
        self._n_lost = 0
        self._reasons: list[str] = []  # why things were lost, each once
        self._warned: set[str] = set()
        self._spool: Optional[Path] = None
        # Fail fast for the tracker's lifetime (read by mlflow.utils.rest_utils at each
        # request): the tracker retries and queues itself, MLflow's own retries with
        # backoff would stall the search for minutes.
        self._env_before = {k: os.environ.get(k) for k in _ENV_KEYS}
        self._env_set = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
        os.environ.update(self._env_set)
        self._start()

    # ---------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        """Whether tracking is on (possibly queueing during an outage), not given up."""
        return self._client is not None and self._gave_up is None

    @property
    def experiment_id(self) -> Optional[str]:
        return self._exp.id

    @property
    def parent_id(self) -> Optional[str]:
        return self._parent.id

    @property
    def pending(self) -> int:
        """Writes waiting in the queue for the server."""
        return len(self._queue)

    @property
    def skipped(self) -> int:
        """MLflow writes not logged (so far): dropped, or still queued."""
        return self._n_lost + len(self._queue)

    def not_logged(self) -> dict[str, dict[str, int]]:
        """What was not logged (so far): ``{run label: {kind: count}}``, e.g.
        ``{"trial t_00001": {"run": 1, "params": 3, "metrics": 24, "end": 1}}``."""
        out: dict[str, collections.Counter] = {k: collections.Counter(v) for k, v in self._lost.items()}
        for op in self._queue:
            out.setdefault(op.label, collections.Counter())[op.kind] += op.n
        return {k: dict(v) for k, v in out.items() if v}

    # ---------------------------------------------------------- writes

    def _write(self, op: _Op) -> Any:
        """Do ``op`` now (retrying briefly) or queue it; never raises. Returns its
        result when it was done now, else None."""
        if self._gave_up is not None:
            self._lose(op, self._gave_up)
            return None
        if self._queue:  # an outage: keep the order, then see whether the server is back
            self._enqueue(op)
            self._flush()
            return op.result
        if self._try(op, self.retries) == WAIT:
            self._enqueue(op)
            self._outage_begins(op)
        return op.result

    def _try(self, op: _Op, retries: int) -> str:
        """One attempt at ``op`` (plus ``retries`` quick ones): DONE, WAIT or LOST."""
        missing = next((r for r in op.refs if r.id is None), None)
        if missing is not None:  # its creation was refused, or it was never asked for
            self._lose(op, f"{missing.label} was not created")
            return LOST
        for attempt in range(retries + 1):
            try:
                result = op.fn()
            except Exception as exc:  # noqa: BLE001 - tracking must never stop the search
                op.error = exc
                kind = self._kind(exc)
                if kind == TRANSIENT and attempt < retries:
                    time.sleep(_RETRY_SLEEPS_S[attempt])
                    continue
                if kind == TRANSIENT:
                    return WAIT
                if kind == FATAL:
                    self._give_up(op, exc)
                else:
                    self._refused(op, exc)
                return LOST
            op.result = result
            if op.then is not None:
                try:
                    op.then(result)
                except Exception:  # noqa: BLE001 - bookkeeping after a write never stops the search
                    log.warning("MLflow: after %s:", op.what, exc_info=True)
            return DONE
        return WAIT  # pragma: no cover - the loop always returns

    def _kind(self, exc: BaseException) -> str:
        """``failure_kind``, plus: a run refused as inactive is FATAL when its whole
        experiment was deleted (every later write would be refused as well)."""
        kind = failure_kind(exc)
        if kind == REFUSED and _RUN_INACTIVE.search(str(exc)) and self._experiment_deleted():
            self._fatal_why = f"the experiment {self.experiment_name!r} was deleted"
            return FATAL
        return kind

    def _experiment_deleted(self) -> bool:
        try:
            return self._client.get_experiment(self._exp.id).lifecycle_stage == "deleted"
        except Exception as exc:  # noqa: BLE001
            return failure_kind(exc) == REFUSED  # gone for good

    def _enqueue(self, op: _Op) -> None:
        if len(self._queue) >= _MAX_QUEUE:
            self._lose(op, f"more than {_MAX_QUEUE} writes were waiting for the server")
            return
        if op.keep is not None:
            try:
                op.keep()
            except Exception as exc:  # noqa: BLE001
                self._lose(op, f"its file could not be kept for later ({_short(exc)})")
                return
        self._queue.append(op)

    def _flush(self, force: bool = False) -> bool:
        """Send the queue in order until it is empty (True) or the server fails again.
        Unless ``force``, only when the pause since the last failed try is over."""
        if not self._queue:
            return True
        if self._gave_up is not None or (not force and time.monotonic() < self._next_try):
            return False
        while self._queue:
            op = self._queue[0]
            outcome = self._try(op, 0)
            if self._gave_up is not None:
                return False
            if outcome == WAIT and not self._poisoned(op):
                self._next_try = time.monotonic() + self._pause_s
                self._pause_s = min(2 * self._pause_s, _MAX_PAUSE_S)
                return False
            self._queue.popleft()
            self._sent += outcome == DONE
        log.warning("MLflow tracking at %s answers again: the %d writes queued during the outage "
                    "were sent.", self.uri, self._sent)
        self._outage, self._pause_s, self._next_try, self._sent = None, _FIRST_PAUSE_S, 0.0, 0
        return True

    def _poisoned(self, op: _Op) -> bool:
        """Whether ``op`` keeps failing although the server answers: then it is dropped
        (a server error on that one request), instead of holding up the queue forever."""
        try:
            self._client.search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - still down: not the request's fault
            return False
        op.failures += 1
        if op.failures < _POISON_TRIES:
            return False
        self._refused(op, op.error or RuntimeError("unknown error"))
        return True

    def flush(self, wait_s: Optional[float] = None) -> bool:
        """Send what is queued, waiting for the server at most ``wait_s`` seconds
        (default ``final_wait_s``, shared by every call at the end of the search).
        True when nothing is left."""
        if wait_s is None:
            if self._final_deadline is None:
                self._final_deadline = time.monotonic() + self.final_wait_s
            deadline = self._final_deadline
        else:
            deadline = time.monotonic() + wait_s
        if self._queue and self._gave_up is None:
            log.info("MLflow: sending %d queued writes to %s (waiting up to %.0f s)", len(self._queue),
                     self.uri, max(0.0, deadline - time.monotonic()))
        while self._queue and self._gave_up is None:
            if self._flush(force=True):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(1.0, left))
        return not self._queue

    def poll(self) -> None:
        """Try to send the queue if its pause is over (called at each trial event)."""
        if self._queue:
            self._flush()

    def _outage_begins(self, op: _Op) -> None:
        self._outage = _short(op.error) if op.error else "unknown error"
        self._next_try = time.monotonic() + self._pause_s
        log.warning("MLflow tracking at %s is not answering (%s, while trying to %s); what the search "
                    "logs from now on is queued and sent when it answers again (tried at each trial "
                    "event, and for up to %.0f s at the end). The search goes on.",
                    self.uri, self._outage, op.what, self.final_wait_s)

    def _lose(self, op: _Op, reason: str) -> None:
        self._n_lost += 1
        self._lost.setdefault(op.label, collections.Counter())[op.kind] += op.n
        if reason not in self._reasons:
            self._reasons.append(reason)
        if op.creates is not None:
            op.creates.lost = True

    def _refused(self, op: _Op, exc: BaseException) -> None:
        self._lose(op, f"refused: {_short(exc, 200)}")
        if op.kind not in self._warned:
            self._warned.add(op.kind)
            log.warning("MLflow refused to %s (%s); not logged, tracking stays on.", op.what, _short(exc))
        else:
            log.debug("MLflow refused to %s: %s", op.what, exc)

    def _give_up(self, op: Optional[_Op], exc: BaseException) -> None:
        """No retry can fix ``exc``: drop ``op`` and the queue, send nothing more."""
        why = self._fatal_why or _short(exc)
        self._gave_up = f"gave up: {why}"
        log.warning("MLflow tracking at %s gave up while trying to %s (%s): a retry cannot fix this. "
                    "Nothing more of this search is logged; the end of the search says what was not. "
                    "The search goes on.", self.uri, op.what if op else "start", why)
        if op is not None:
            self._lose(op, self._gave_up)
        while self._queue:
            self._lose(self._queue.popleft(), self._gave_up)

    def _read(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """A look-up: never queued; ``default`` when the server is down or refuses."""
        if not self.enabled or (self._queue and not self._flush()):
            return default
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            log.debug("MLflow: could not %s: %s", what, _short(exc))
            return default

    # ---------------------------------------------------------- start

    def _start(self) -> None:
        """Make the client, then get or create the experiment (queued when the server
        is not answering yet)."""
        try:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:  # noqa: BLE001
            self._gave_up = f"MLflow cannot be used ({_short(exc)})"
            log.warning("%s; tracking is OFF: nothing of this search will be logged to MLflow.",
                        self._gave_up)
            return
        self._write(_Op(f"get or create experiment {self.experiment_name!r}", self._experiment,
                        "experiment", "experiment", then=self._set(self._exp), creates=self._exp))

    @staticmethod
    def _set(ref: _Ref) -> Callable[[Any], None]:
        def set_id(value: Any) -> None:
            ref.id = value

        return set_id

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

    def _run_ref(self, run: RunLike) -> _Ref:
        """The ref of a run given as None (the parent), an id or a ref."""
        if isinstance(run, _Ref):
            return run
        if run is None or run == self._parent.id:
            return self._parent
        return _Ref(f"run {run}", str(run))

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
                        c.log_batch(run.info.run_id, tags=_run_tags(tags))
                    log.info("MLflow: resuming parent run %s", run.info.run_id)
                    return run.info.run_id
                log.warning("MLflow: parent run %s was not found; starting a new parent run",
                            existing_run_id)
            return c.create_run(self._exp.id, run_name=run_name,
                                tags={ROLE_TAG: "search", **tags}).info.run_id

        self._write(_Op("create the parent run", open_parent, self._parent.label, "run",
                        refs=(self._exp,), then=self._set(self._parent), creates=self._parent))
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
        self._write(_Op(f"end the parent run as {status}",
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

        return self._write(_Op("delete the runs of lost trials", drop, ref.label, "cleanup",
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
            new = [(k, v) for k, v in flat.items() if k not in have]
            from mlflow.entities import Param

            for i in range(0, len(new), _PARAMS_PER_BATCH):
                batch = new[i:i + _PARAMS_PER_BATCH]
                self._client.log_batch(ref.id, params=[Param(k, v) for k, v in batch])
                have.update(batch)

        self._write(_Op(f"log {len(flat)} params", send, ref.label, "params", n=len(flat), refs=(ref,)))

    def log_metrics(self, run: RunLike, metrics: Mapping[str, Any], step: int = 0,
                    timestamp_ms: Optional[int] = None) -> None:
        """Log the numeric values of ``metrics`` at ``step`` in batches. Each value gets
        its timestamp now: a write sent again after a timeout is the same metric, which
        MLflow keeps once."""
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = [(k, x, ts, int(step)) for k, v in metrics.items() if (x := _number(v)) is not None]
        if not items:
            return
        ref = self._run_ref(run)
        for i in range(0, len(items), _METRICS_PER_BATCH):
            batch = items[i:i + _METRICS_PER_BATCH]
            self._write(_Op(f"log {len(batch)} metrics", lambda b=batch: self._client.log_batch(
                ref.id, metrics=_metrics(b)), ref.label, "metrics", n=len(batch), refs=(ref,)))

    def set_tags(self, run: RunLike, tags: Mapping[str, Any],
                 metrics: Callable[[], Sequence[Any]] = list) -> None:
        """Set ``tags`` (and log ``metrics()``, worked out when the write runs)."""
        ref = self._run_ref(run)
        tags = {str(k): str(v) for k, v in tags.items()}
        self._write(_Op(f"set tags {', '.join(sorted(tags))[:80]}",
                        lambda: self._client.log_batch(ref.id, metrics=list(metrics()), tags=_run_tags(tags)),
                        ref.label, "tags", n=len(tags), refs=(ref,)))

    def end_run(self, run: RunLike, status: str) -> None:
        ref = self._run_ref(run)
        self._ended.discard(ref)
        self._write(_Op(f"end the run of {ref.label} as {status}",
                        lambda: self._client.set_terminated(ref.id, status=status), ref.label, "end",
                        refs=(ref,), then=lambda _: self._ended.add(ref)))

    def reopen_run(self, run: RunLike) -> None:
        """Mark a run RUNNING again (a trial restarted after its worker died)."""
        ref = self._run_ref(run)

        def reopen() -> None:
            self._client.update_run(ref.id, status="RUNNING")
            self._client.set_tag(ref.id, STATUS_TAG, RUNNING)

        self._ended.discard(ref)
        self._write(_Op(f"mark the run of {ref.label} RUNNING", reopen, ref.label, "tags", refs=(ref,)))

    def log_text(self, run: RunLike, text: str, artifact_file: str) -> None:
        ref = self._run_ref(run)
        self._write(_Op(f"log {artifact_file}", lambda: self._client.log_text(ref.id, text, artifact_file),
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

        self._write(_Op(f"log {'folder' if path.is_dir() else 'file'} {path}", send, ref.label, "artifact",
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
                     params_of: Optional[Callable[[dict], dict]] = None) -> "TrialLogger":
        """A ``TrialLogger`` logging each trial as a nested child run of the parent run.
        ``params_of`` picks the params to log out of a trial's config (a module-level
        function: the logger is pickled with Tune's callbacks)."""
        return TrialLogger(self, metric=metric, mode=mode, max_epochs=max_epochs, params_of=params_of)

    def child_run(self, trial_id: str, name: Optional[str] = None,
                  on_found: Optional[Callable[[Any], None]] = None) -> _Ref:
        """The run of trial ``trial_id`` under the parent: found again when it exists (a
        resumed search; marked RUNNING, ``on_found(run)`` is called) or created. The
        look-up happens when the write runs, so a run queued during an outage is still
        created once."""
        tid = str(trial_id)
        ref = self._children.get(tid)
        if ref is not None:
            return ref
        ref = self._children[tid] = _Ref(f"trial {tid}")
        run_name = str(name or f"trial_{tid}")
        found: list[Any] = []

        def get_or_create() -> str:
            c = self._client
            run = self._find_child_now(tid)
            if run is not None:
                c.update_run(run.info.run_id, status="RUNNING")
                c.set_tag(run.info.run_id, STATUS_TAG, RUNNING)
                found[:] = [run]
                return run.info.run_id
            return c.create_run(self._exp.id, run_name=run_name, tags={
                PARENT_TAG: self._parent.id, TRIAL_ID_TAG: tid, STATUS_TAG: RUNNING,
                ROLE_TAG: "trial"}).info.run_id

        def then(run_id: str) -> None:
            ref.id = run_id
            if found and on_found is not None:
                on_found(found[0])

        self._write(_Op(f"create the run of trial {tid}", get_or_create, ref.label, "run",
                        refs=(self._exp, self._parent), then=then, creates=ref))
        return ref

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
        return self._read(f"look up the run of trial {trial_id}",
                          lambda: self._find_child_now(str(trial_id), parent_id))

    def metric_history(self, run_id: str, key: str) -> list:
        """``get_metric_history`` (raises when MLflow fails)."""
        return self._client.get_metric_history(run_id, key)

    # ---------------------------------------------------------- after the search

    def reconcile(self, trials: Iterable["TrialRecord"], metric: str = "val/f1_macro",
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
                ref = self._children[tid] = _Ref(f"trial {tid}")

            def then(run_id: str, ref: _Ref = ref) -> None:
                ref.id, ref.lost = run_id, False

            self._write(_Op(f"reconcile the run of trial {tid}",
                            lambda rec=rec: self._reconcile_one(rec, metric, mode, max_epochs),
                            ref.label, "reconcile", refs=(self._exp, self._parent), then=then))

    def _reconcile_one(self, rec: "TrialRecord", metric: str, mode: str,
                       max_epochs: Optional[int]) -> str:
        """Reconcile one trial (may be run again after a failure: it only adds what is
        missing). Returns its run id."""
        from mlflow.entities import Param

        c, tid = self._client, str(rec.trial_id)
        rows = [flatten(r, sep="/") for r in rec.history]
        run_id, have, steps, still_open = self._reconcile_run(rec, metric)
        params = [Param(k, param_value(v)) for k, v in flatten(rec.params).items() if k not in have]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            c.log_batch(run_id, params=params[i:i + _PARAMS_PER_BATCH])
        best, missing = BestSoFar(metric, mode), []
        for row in rows:
            epoch = int(_epoch_of(row))
            best.update(_number(row.get(metric)), epoch)
            if epoch not in steps:
                missing += _row_metrics(row, epoch)
        for i in range(0, len(missing), _METRICS_PER_BATCH):
            c.log_batch(run_id, metrics=missing[i:i + _METRICS_PER_BATCH])
        if still_open:
            self._close_reconciled(run_id, rec, rows, best, max_epochs)
        if missing or params or still_open:
            log.info("MLflow: reconciled trial %s (%d params, %d metric values%s)", tid, len(params),
                     len(missing), ", run closed" if still_open else "")
        return run_id

    def _reconcile_run(self, rec: "TrialRecord", metric: str) -> tuple[str, dict, set, bool]:
        """(run id, its params, the epochs its metric was logged at, whether it is
        RUNNING) of the trial's run; created when there is none."""
        tid = str(rec.trial_id)
        run = self._find_child_now(tid)
        if run is None:
            run_id = self._client.create_run(self._exp.id, run_name=str(rec.name or f"trial_{tid}"), tags={
                PARENT_TAG: self._parent.id, TRIAL_ID_TAG: tid, STATUS_TAG: RUNNING, ROLE_TAG: "trial"}
            ).info.run_id
            return run_id, {}, set(), True
        run_id = run.info.run_id
        steps = {m.step for m in self._client.get_metric_history(run_id, metric)}
        return run_id, dict(run.data.params), steps, run.info.status == "RUNNING"

    def _close_reconciled(self, run_id: str, rec: "TrialRecord", rows: Sequence[Mapping[str, Any]],
                          best: BestSoFar, max_epochs: Optional[int]) -> None:
        """End a run as its trial ended (KILLED when it did not), tagged as reconciled."""
        status_tag, run_status = _outcome(rec, rows, max_epochs)
        tags = {STATUS_TAG: status_tag, LAST_EPOCH_TAG: str(int(_epoch_of(rows[-1]))) if rows else "0",
                RECONCILED_TAG: "true"}
        if rec.error:
            tags[ERROR_TAG] = _clip_error(rec.error)
        # timestamped as the trial's last result: sent again, it is the same metric
        extra = [(f"best/{best.metric}", best.value, _row_ts(rows[-1]), best.step)] if best.value is not None else []
        self._client.log_batch(run_id, metrics=_metrics(extra), tags=_run_tags(tags))
        self._client.set_terminated(run_id, status=run_status)

    # ---------------------------------------------------------- the best trial

    def log_best(self, parent_id: Optional[str], best_trial_id: str, best_config: Mapping[str, Any],
                 best_metrics: Mapping[str, Any], test_metrics: Mapping[str, Any], confusion: Any,
                 class_names: Sequence[str], checkpoint_dir: Optional[Path], model: Any,
                 preprocessing: Mapping[str, Any], register_name: Optional[str] = None
                 ) -> Optional[str]:
        """Log the best trial on the parent run: ``best/`` params and metrics, ``test/``
        metrics, the confusion matrix (JSON + PNG), the checkpoint folder under
        ``best_checkpoint/``, ``preprocessing.json``, the model as an MLflow PyTorch model
        named "model" in the search's experiment (registered as ``register_name`` when
        given). Returns the model URI (``models:/<id>``), or None when it was not logged
        (yet: during an outage it is queued)."""
        ref = self._run_ref(parent_id)
        self.log_params(ref, {f"best/{k}": v for k, v in flatten(best_config).items()})
        metrics = {(k if k.startswith("best/") else f"best/{k}"): v for k, v in best_metrics.items()}
        metrics.update({(k if k.startswith("test/") else f"test/{k}"): v
                        for k, v in test_metrics.items()})
        self.log_metrics(ref, metrics)
        self.set_tags(ref, {BEST_TRIAL_TAG: best_trial_id})
        self._tag_best_child(str(best_trial_id), ref)
        prep = _jsonable(dict(preprocessing))
        # Files live as long as the tracker: a write queued during an outage sends them later.
        tmpdir = Path(tempfile.mkdtemp(dir=self._spool_dir()))
        if confusion is not None:
            self._log_confusion(ref, confusion, class_names, tmpdir)
        prep_file = tmpdir / "preprocessing.json"
        prep_file.write_text(json.dumps(prep, indent=2))
        self.log_path(ref, prep_file)
        if checkpoint_dir is not None:
            self.log_path(ref, Path(checkpoint_dir), artifact_path="best_checkpoint")
        if model is None:
            return None
        model_ref = _Ref("the best model")
        self._write(_Op("log the best model", lambda: self._log_model(ref.id, model, prep, prep_file),
                        ref.label, "model", refs=(self._exp, ref), then=self._set(model_ref),
                        creates=model_ref))
        if register_name:
            self._write(_Op(f"register the model as {register_name!r}",
                            lambda: self._register(model_ref.id, register_name, ref.id),
                            ref.label, "register", refs=(model_ref, ref)))
        return model_ref.id

    def _tag_best_child(self, trial_id: str, parent: _Ref) -> None:
        def tag() -> None:
            child = self._children.get(trial_id)
            run_id = child.id if child is not None and child.id else None
            if run_id is None:
                run = self._find_child_now(trial_id, parent.id)
                run_id = run.info.run_id if run is not None else None
            if run_id is not None:
                self._client.set_tag(run_id, "cxrtune.best", "true")

        self._write(_Op(f"tag the run of trial {trial_id} as the best", tag, f"trial {trial_id}", "tags",
                        refs=(self._exp, parent)))

    def _log_confusion(self, run: _Ref, confusion: Any, class_names: Sequence[str],
                       tmpdir: Path) -> None:
        import numpy as np

        cm = np.asarray(confusion)
        names = [str(c) for c in class_names]
        js = tmpdir / "confusion_matrix.json"
        js.write_text(json.dumps({"class_names": names, "rows": "true class",
                                  "columns": "predicted class", "matrix": cm.tolist()}, indent=2))
        self.log_path(run, js)
        try:
            png = _confusion_png(cm, names, tmpdir / "confusion_matrix.png")
        except Exception as exc:  # noqa: BLE001 - a plot never stops the search
            log.warning("could not plot the confusion matrix (%s); only its JSON is logged", _short(exc))
            return
        self.log_path(run, png)

    def _log_model(self, run_id: str, model: Any, prep: dict[str, Any], prep_file: Path) -> str:
        import copy

        import mlflow.pytorch

        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()
        model.eval()
        # The logged model is created here, in the search's experiment: left to itself,
        # log_model puts it in the fluent API's current experiment, "Default" (id 0),
        # since no run is active in the fluent API.
        c = self._client
        logged = c.create_logged_model(self._exp.id, name="model", source_run_id=run_id,
                                       params={k: str(v) for k, v in c.get_run(run_id).data.params.items()})
        with self._env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(self.artifact_timeout_s)), _tracking_uri(self.uri):
            info = mlflow.pytorch.log_model(
                model, name="model", run_id=run_id, model_id=logged.model_id,
                # Given explicitly, so MLflow does not infer requirements (slow, needs the network).
                pip_requirements=_requirements(),
                serialization_format="pickle",  # 3.17's default 'pt2' needs an input example
                metadata={"preprocessing": prep},
                extra_files=[str(prep_file)],
            )
        return info.model_uri

    def _register(self, model_uri: str, name: str, run_id: str) -> str:
        import mlflow

        with self._env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(self.artifact_timeout_s)), _tracking_uri(self.uri):
            mv = mlflow.register_model(model_uri, name, await_registration_for=60)
        self.registered = f"{name}/{mv.version}"
        self._client.set_tag(run_id, REGISTERED_TAG, self.registered)
        log.info("MLflow: registered %s as model %r version %s", model_uri, name, mv.version)
        return str(mv.version)

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
        if self.enabled:
            self.flush()
        self._closed = True
        if self._queue:
            reason = f"the server did not answer ({self._outage or 'unknown error'})"
            while self._queue:
                self._lose(self._queue.popleft(), reason)
        if self._n_lost:
            log.warning("%d MLflow writes were not logged to %s (%s). Not logged: %s.", self._n_lost,
                        self.uri, "; ".join(self._reasons), describe_not_logged(self.not_logged()))
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
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


def describe_not_logged(report: Mapping[str, Mapping[str, int]]) -> str:
    """``{"trial t1": {"run": 1, "metrics": 24}}`` -> "trial t1: the run itself, 24 metric values"."""
    parts = []
    for label, kinds in report.items():
        words = [f"{n} {_KIND_WORDS.get(k, k)}" if k in _COUNTED else _KIND_WORDS.get(k, k)
                 for k, n in kinds.items()]
        parts.append(f"{label}: {', '.join(words)}")
    return "; ".join(parts) or "nothing"


def _metrics(items: Iterable[tuple]) -> list:
    """``(key, value, timestamp ms, step)`` tuples as MLflow ``Metric``s."""
    from mlflow.entities import Metric

    return [Metric(*item) for item in items]


def _run_tags(tags: Mapping[str, Any]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(str(k), str(v)) for k, v in tags.items()]


def _row_metrics(row: Mapping[str, Any], epoch: int) -> list:
    """The metrics of one Tune result row (``flatten``ed), timestamped as Tune reported it
    (so a row logged twice is the same metric)."""
    from mlflow.entities import Metric

    ts_ms = _row_ts(row)
    out = []
    for k, v in row.items():
        x = _number(v)
        if (k.startswith(METRIC_PREFIXES) or k in METRIC_KEYS) and x is not None and not math.isnan(x):
            out.append(Metric(k, x, ts_ms, epoch))
    return out


def _row_ts(row: Mapping[str, Any]) -> int:
    """A Tune result's time (its ``timestamp``, seconds) in milliseconds; 0 without one."""
    ts = _number(row.get("timestamp"))
    return int(ts * 1000) if ts is not None and not math.isnan(ts) else 0


def _outcome(rec: "TrialRecord", rows: Sequence[Mapping[str, Any]],
             max_epochs: Optional[int]) -> tuple[str, str]:
    """(cxrtune.status, MLflow run status) of a trial as Tune left it."""
    if rec.state == "ERROR":
        return FAILED, "FAILED"
    if rec.state != "TERMINATED":
        return KILLED, "KILLED"  # the search stopped before the trial ended
    if not rows:
        return NOT_STARTED, "KILLED"
    return ended_as(rows[-1], max_epochs), "FINISHED"


def ended_as(last: Mapping[str, Any], max_epochs: Optional[int]) -> str:
    """How a trial that ended without an error ended, from its last result: COMPLETED (all
    its epochs, or its own early stopping) or STOPPED_EARLY (by the scheduler)."""
    if last.get("early_stopped") or max_epochs is None or _epoch_of(last) >= max_epochs:
        return COMPLETED
    return STOPPED_EARLY


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


# ------------------------------------------------------------------ trials


def _never_raises(hook: Callable) -> Callable:
    """Tracking must never stop the search (Tune fails the search on a callback's
    exception): a surprise in a hook is logged and the hook returns."""

    @functools.wraps(hook)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception:  # noqa: BLE001
            log.warning("MLflow tracking: %s failed; the search goes on", hook.__name__, exc_info=True)

    return guarded


def _epoch_of(result: Mapping[str, Any]) -> float:
    """The engine's epoch of a Tune result (Tune's iteration count when it has none)."""
    epoch = _number(result.get("epoch"))
    if epoch is not None and not math.isnan(epoch):
        return epoch
    it = _number(result.get("training_iteration"))
    return it if it is not None and not math.isnan(it) else 0.0


@dataclass
class TrialRecord:
    """What Tune knows of one trial at the end of a search (for ``Tracker.reconcile``)."""

    trial_id: str
    params: dict  # the searched values, as the child run's params
    history: list = field(default_factory=list)  # the trial's results, one per epoch, oldest first
    state: str = "TERMINATED"  # Tune's status: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    error: Optional[str] = None
    name: Optional[str] = None


class TrialLogger:
    """What the driver-side Tune callback does; Ray-free (search.py's ``ray.tune.Callback``
    delegates its hooks here, with Tune's arguments).

    For each trial: ``on_trial_start`` gets or creates one child run (tags
    ``cxrtune.trial_id``, ``mlflow.parentRunId``; an existing one is found again on a
    resumed search) and logs the trial's params (``params_of(trial.config)``);
    ``on_trial_result`` logs the ``train/``, ``val/``, ``time/``, ``lr`` and ``best``
    metrics at step ``epoch``; ``on_trial_complete`` tags ``cxrtune.status`` completed
    (reached ``max_epochs``, or ended by itself: early stopping) or stopped_early
    (stopped by the scheduler) and ends the run FINISHED; ``on_trial_error`` tags failed
    + the error and ends it FAILED. Each logs ``best/<metric>``, the trial's best value
    (``selection.BestSoFar``).

    Tune pickles its callbacks (tuner.pkl) and ``Tuner.restore`` brings them back: the
    logger pickles without its tracker, and the driver ``attach``es the live one.
    """

    def __init__(self, tracker: Optional[Tracker], metric: str = "val/f1_macro",
                 mode: Optional[str] = None, max_epochs: Optional[int] = None,
                 params_of: Optional[Callable[[dict], dict]] = None) -> None:
        self.tracker = tracker
        self.metric, self.max_epochs = metric, max_epochs
        self.mode = mode or direction(metric)
        self.params_of = params_of or dict
        self._last: dict[str, tuple[int, bool]] = {}  # trial id -> (last epoch, ended by early stopping)
        self._best: dict[str, BestSoFar] = {}  # trial id -> its best value of `metric`
        self._params: dict[str, dict[str, str]] = {}  # trial id -> params its run has
        self._started: set[str] = set()  # trials started by this driver

    def attach(self, tracker: Tracker) -> "TrialLogger":
        """Log to ``tracker`` (after ``Tuner.restore`` unpickled this logger)."""
        self.tracker = tracker
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(tracker=None, _params={}, _started=set())  # a live connection is not data
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------ runs

    def _tracker(self) -> Optional[Tracker]:
        """The tracker to log to (None: not attached); sends its queue when the pause
        after a failed try is over. A tracker that gave up still gets the writes: it
        counts them for its report of what was not logged."""
        t = self.tracker
        if t is not None:
            t.poll()
        return t

    def _run_of(self, t: Tracker, trial: Any) -> _Ref:
        tid = str(trial.trial_id)
        self._params.setdefault(tid, {})
        return t.child_run(tid, getattr(trial, "custom_trial_name", None),
                           on_found=lambda run: self._found(tid, run))

    def _found(self, tid: str, run: Any) -> None:
        """The trial's run already existed (a resumed search): what it has logged."""
        self._params.setdefault(tid, {}).update(run.data.params)
        try:
            history = self.tracker.metric_history(run.info.run_id, self.metric) if self.tracker else []
        except Exception as exc:  # noqa: BLE001 - the best-so-far then starts from this driver's results
            log.debug("MLflow: could not read the history of trial %s: %s", tid, _short(exc))
            history = []
        for m in history:
            self._best_of(tid).update(m.value, int(m.step))

    def _best_of(self, tid: str) -> BestSoFar:
        return self._best.setdefault(tid, BestSoFar(self.metric, self.mode))

    # ------------------------------------------------------ hooks

    @_never_raises
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self._tracker()
        if t is None:
            return
        tid = str(trial.trial_id)
        restarted = tid in self._started  # by Tune, after its worker or node died
        self._started.add(tid)
        ref = self._run_of(t, trial)
        if restarted:
            t.reopen_run(ref)
        t.log_params(ref, self.params_of(dict(getattr(trial, "config", None) or {})), self._params[tid])

    @_never_raises
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        tid = str(trial.trial_id)
        flat = flatten(result, sep="/")
        epoch = int(_epoch_of(flat))
        self._last[tid] = (epoch, bool(flat.get("early_stopped")))
        self._best_of(tid).update(_number(flat.get(self.metric)), epoch)
        t = self._tracker()
        if t is None:
            return
        metrics = {k: v for k, v in flat.items() if k.startswith(METRIC_PREFIXES) or k in METRIC_KEYS}
        t.log_metrics(self._run_of(t, trial), metrics, step=epoch)

    def _finish(self, trial: Any, status_tag: str, run_status: str, extra_tags: Mapping[str, str],
                epoch: int) -> Optional[_Ref]:
        t = self._tracker()
        if t is None:
            return None
        tid = str(trial.trial_id)
        ref = self._run_of(t, trial)
        best, ts = self._best_of(tid), int(time.time() * 1000)

        def best_metric() -> list:  # when the write runs: a found run's history counts too
            from mlflow.entities import Metric

            return [Metric(f"best/{self.metric}", best.value, ts, epoch)] if best.value is not None else []

        t.set_tags(ref, {STATUS_TAG: status_tag, LAST_EPOCH_TAG: str(epoch), **extra_tags}, best_metric)
        t.end_run(ref, run_status)
        return ref

    def _last_epoch(self, trial: Any) -> tuple[int, bool]:
        """(last epoch, ended by early stopping), from the results this driver saw, else
        from Tune's record of the trial (a resumed search)."""
        tid = str(trial.trial_id)
        if tid in self._last:
            return self._last[tid]
        last = getattr(trial, "last_result", None) or {}
        return int(_epoch_of(last)), bool(last.get("early_stopped"))

    @_never_raises
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch, early = self._last_epoch(trial)
        self._finish(trial, ended_as({"epoch": epoch, "early_stopped": early}, self.max_epochs), "FINISHED", {},
                     epoch)

    @_never_raises
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = error_text(trial, info)
        epoch, _ = self._last_epoch(trial)
        ref = self._finish(trial, FAILED, "FAILED", {ERROR_TAG: _clip_error(text)}, epoch)
        if ref is not None and text and len(text) > ERROR_CHARS:
            self.tracker.log_text(ref, text, "error.txt")


def error_text(trial: Any, info: Optional[Mapping[str, Any]] = None) -> str:
    """The trial's error: its error file (Tune writes it before calling on_trial_error),
    else ``trial.get_error()``, else an ``error`` Tune might pass."""
    info = info or {}
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


__all__ = ["Tracker", "TrialLogger", "TrialRecord", "DEFAULT_URI", "DEFAULT_EXPERIMENT", "flatten",
           "param_value", "failure_kind", "describe_not_logged", "error_text", "TRIAL_ID_TAG", "STATUS_TAG",
           "LAST_EPOCH_TAG", "ERROR_TAG", "RECONCILED_TAG", "COMPLETED", "STOPPED_EARLY", "FAILED",
           "KILLED", "RUNNING"]
