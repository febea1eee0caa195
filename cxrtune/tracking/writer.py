"""The retrying, queueing MLflow writer: every MLflow write is an operation (``Op``) run
through one place, ``Writer.write``.

* a write that fails for a reason a retry can fix (connection refused, a timeout, a
  5xx) is retried a couple of times at once (``retries``, short sleeps);
* if it still fails, it is QUEUED, and so is every later write (in order, so a run's
  creation, params, metrics, tags and termination keep their order); the queue is
  sent when the server answers again: tried at later writes and trial events (with a
  growing pause between tries), and at the end of the search for up to
  ``final_wait_s``. Runs created while the server was down get their id when they are
  created; writes that need it wait for it (``Ref``);
* a write the server *refuses* (a changed param, an invalid value) is dropped with a
  warning and tracking stays on;
* errors a retry cannot fix (bad credentials, the experiment deleted) make the writer
  give up: nothing more is sent.

``close()`` says exactly what was not logged (which runs, how many params, metric
values, tags), and ``not_logged()`` returns it. Reads (look-ups, ``read``) are never
queued: when the server is down they return nothing, and the writes that depend on
them look up again when they run.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from .common import log, short

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


def describe_not_logged(report: Mapping[str, Mapping[str, int]]) -> str:
    """``{"trial t1": {"run": 1, "metrics": 24}}`` -> "trial t1: the run itself, 24 metric values"."""
    parts = []
    for label, kinds in report.items():
        words = [f"{n} {_KIND_WORDS.get(k, k)}" if k in _COUNTED else _KIND_WORDS.get(k, k)
                 for k, n in kinds.items()]
        parts.append(f"{label}: {', '.join(words)}")
    return "; ".join(parts) or "nothing"


class Ref:
    """The id of something MLflow creates (the experiment, a run), known once it is
    created: writes queued before that use it when they run."""

    __slots__ = ("label", "id", "lost")

    def __init__(self, label: str, id: Optional[str] = None) -> None:
        self.label, self.id, self.lost = label, id, False

    def __repr__(self) -> str:
        return f"Ref({self.label!r}, {self.id!r})"

    def setter(self) -> Callable[[Any], None]:
        """An ``Op.then`` that records the created id."""
        def set_id(value: Any) -> None:
            self.id = value

        return set_id


@dataclass(eq=False)
class Op:
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
    creates: Optional[Ref] = None
    keep: Optional[Callable[[], None]] = None
    result: Any = None
    error: Optional[BaseException] = None
    failures: int = 0


class Writer:
    """Runs ``Op``s now, retrying briefly, or queues them during an outage (see the
    module docstring). Knows nothing of runs: the tracker gives it two questions to
    ask the server. ``ping()`` raises unless the server answers; ``fatal_reason(exc)``
    says why a REFUSED error means that no later write can succeed either (None when
    it does not). ``uri`` only names the server in messages."""

    def __init__(self, uri: str, *, retries: int, final_wait_s: float, ping: Callable[[], Any],
                 fatal_reason: Callable[[BaseException], Optional[str]]) -> None:
        self.uri = uri
        self.retries = min(retries, len(_RETRY_SLEEPS_S))
        self.final_wait_s = final_wait_s
        self._ping, self._fatal_reason = ping, fatal_reason
        self._queue: collections.deque[Op] = collections.deque()
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

    # ---------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        """Whether writes are sent (possibly queued during an outage), not given up."""
        return self._gave_up is None

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

    def off(self, reason: str) -> None:
        """Send nothing, ever: MLflow cannot be used (every write is counted as lost)."""
        self._gave_up = reason

    # ---------------------------------------------------------- writes

    def write(self, op: Op) -> Any:
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

    def read(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """A look-up: never queued; ``default`` when the server is down or refuses."""
        if not self.enabled or (self._queue and not self._flush()):
            return default
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            log.debug("MLflow: could not %s: %s", what, short(exc))
            return default

    def _try(self, op: Op, retries: int) -> str:
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
        """``failure_kind``, plus: a refusal that no later write can get past (the
        tracker's ``fatal_reason``, e.g. the whole experiment deleted) is FATAL."""
        kind = failure_kind(exc)
        if kind == REFUSED:
            why = self._fatal_reason(exc)
            if why:
                self._fatal_why = why
                return FATAL
        return kind

    def _enqueue(self, op: Op) -> None:
        if len(self._queue) >= _MAX_QUEUE:
            self._lose(op, f"more than {_MAX_QUEUE} writes were waiting for the server")
            return
        if op.keep is not None:
            try:
                op.keep()
            except Exception as exc:  # noqa: BLE001
                self._lose(op, f"its file could not be kept for later ({short(exc)})")
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

    def _poisoned(self, op: Op) -> bool:
        """Whether ``op`` keeps failing although the server answers: then it is dropped
        (a server error on that one request), instead of holding up the queue forever."""
        try:
            self._ping()
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

    def close(self) -> None:
        """Send what is queued (waiting at most ``final_wait_s`` for the server), then say
        exactly what was not logged."""
        if self.enabled:
            self.flush()
        if self._queue:
            reason = f"the server did not answer ({self._outage or 'unknown error'})"
            while self._queue:
                self._lose(self._queue.popleft(), reason)
        if self._n_lost:
            log.warning("%d MLflow writes were not logged to %s (%s). Not logged: %s.", self._n_lost,
                        self.uri, "; ".join(self._reasons), describe_not_logged(self.not_logged()))

    # ---------------------------------------------------------- failures

    def _outage_begins(self, op: Op) -> None:
        self._outage = short(op.error) if op.error else "unknown error"
        self._next_try = time.monotonic() + self._pause_s
        log.warning("MLflow tracking at %s is not answering (%s, while trying to %s); what the search "
                    "logs from now on is queued and sent when it answers again (tried at each trial "
                    "event, and for up to %.0f s at the end). The search goes on.",
                    self.uri, self._outage, op.what, self.final_wait_s)

    def _lose(self, op: Op, reason: str) -> None:
        self._n_lost += 1
        self._lost.setdefault(op.label, collections.Counter())[op.kind] += op.n
        if reason not in self._reasons:
            self._reasons.append(reason)
        if op.creates is not None:
            op.creates.lost = True

    def _refused(self, op: Op, exc: BaseException) -> None:
        self._lose(op, f"refused: {short(exc, 200)}")
        if op.kind not in self._warned:
            self._warned.add(op.kind)
            log.warning("MLflow refused to %s (%s); not logged, tracking stays on.", op.what, short(exc))
        else:
            log.debug("MLflow refused to %s: %s", op.what, exc)

    def _give_up(self, op: Optional[Op], exc: BaseException) -> None:
        """No retry can fix ``exc``: drop ``op`` and the queue, send nothing more."""
        why = self._fatal_why or short(exc)
        self._gave_up = f"gave up: {why}"
        log.warning("MLflow tracking at %s gave up while trying to %s (%s): a retry cannot fix this. "
                    "Nothing more of this search is logged; the end of the search says what was not. "
                    "The search goes on.", self.uri, op.what if op else "start", why)
        if op is not None:
            self._lose(op, self._gave_up)
        while self._queue:
            self._lose(self._queue.popleft(), self._gave_up)
