"""Trials: what the driver-side Tune callback does (``TrialLogger``, Ray-free: search.py's
small ``ray.tune.Callback`` delegates to it), what Tune knows of a trial at the end
(``TrialRecord``), and how a trial's results read as MLflow's metrics and statuses
(``ended_as``, ``error_text``, and the helpers ``Tracker.reconcile`` works from)."""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from ..selection import BestSoFar, direction
from .common import (COMPLETED, ERROR_CHARS, ERROR_TAG, FAILED, KILLED, LAST_EPOCH_TAG, NOT_STARTED,
                     RECONCILED_TAG, STATUS_TAG, STOPPED_EARLY, flatten, is_trial_metric, log, metric_entities,
                     not_nan, number, short)

if TYPE_CHECKING:
    from .tracker import Tracker
    from .writer import Ref


@dataclass
class TrialRecord:
    """What Tune knows of one trial at the end of a search (for ``Tracker.reconcile``)."""

    trial_id: str
    params: dict  # the searched values, as the child run's params
    history: list = field(default_factory=list)  # the trial's results, one per epoch, oldest first
    state: str = "TERMINATED"  # Tune's status: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    error: Optional[str] = None
    name: Optional[str] = None


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


class TrialLogger:
    """What the driver-side Tune callback does; Ray-free (search.py's ``ray.tune.Callback``
    delegates its hooks here, with Tune's arguments).

    For each trial: ``on_trial_start`` gets or creates one child run (tags
    ``cxrtune.trial_id``, ``mlflow.parentRunId``; an existing one is found again on a
    resumed search) and logs the trial's params (``params_of(trial.config)``);
    ``on_trial_result`` logs the ``train/``, ``val/``, ``time/``, ``cost/``, ``cv/``, ``lr`` and ``best``
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

    def _run_of(self, t: Tracker, trial: Any) -> Ref:
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
            log.debug("MLflow: could not read the history of trial %s: %s", tid, short(exc))
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
        epoch = int(epoch_of(flat))
        self._last[tid] = (epoch, bool(flat.get("early_stopped")))
        self._best_of(tid).update(number(flat.get(self.metric)), epoch)
        t = self._tracker()
        if t is None:
            return
        metrics = {k: v for k, v in flat.items() if is_trial_metric(k)}
        t.log_metrics(self._run_of(t, trial), metrics, step=epoch)

    def _finish(self, trial: Any, status_tag: str, run_status: str, extra_tags: Mapping[str, str],
                epoch: int) -> Optional[Ref]:
        t = self._tracker()
        if t is None:
            return None
        tid = str(trial.trial_id)
        ref = self._run_of(t, trial)
        best, ts = self._best_of(tid), int(time.time() * 1000)

        def best_metric() -> list:  # when the write runs: a found run's history counts too
            return metric_entities(best_metric_values(best, ts, epoch))

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
        return int(epoch_of(last)), bool(last.get("early_stopped"))

    @_never_raises
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch, early = self._last_epoch(trial)
        self._finish(trial, ended_as({"epoch": epoch, "early_stopped": early}, self.max_epochs), "FINISHED", {},
                     epoch)

    @_never_raises
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = error_text(trial, info)
        epoch, _ = self._last_epoch(trial)
        ref = self._finish(trial, FAILED, "FAILED", {ERROR_TAG: clip_error(text)}, epoch)
        if ref is not None and text and len(text) > ERROR_CHARS:
            self.tracker.log_text(ref, text, "error.txt")


# ------------------------------------------------------------------ a trial's results


def epoch_of(result: Mapping[str, Any]) -> float:
    """The engine's epoch of a Tune result (Tune's iteration count when it has none)."""
    epoch = not_nan(result.get("epoch"))
    if epoch is not None:
        return epoch
    it = not_nan(result.get("training_iteration"))
    return it if it is not None else 0.0


def ended_as(last: Mapping[str, Any], max_epochs: Optional[int]) -> str:
    """How a trial that ended without an error ended, from its last result: COMPLETED (all
    its epochs, or its own early stopping) or STOPPED_EARLY (by the scheduler)."""
    if last.get("early_stopped") or max_epochs is None or epoch_of(last) >= max_epochs:
        return COMPLETED
    return STOPPED_EARLY


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


def clip_error(text: str, n: int = ERROR_CHARS) -> str:
    """``text`` in at most ``n`` characters: its start and its end (where the exception is)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()  # Ray colours its traceback header
    if len(text) <= n:
        return text
    head = n // 5
    return text[:head] + "\n...\n" + text[-(n - head - 5):]


def best_metric_values(best: BestSoFar, ts_ms: int, step: int) -> list[tuple]:
    """``best/<metric>`` as ``(key, value, timestamp ms, step)``; none before a value."""
    return [(f"best/{best.metric}", best.value, ts_ms, step)] if best.value is not None else []


# ------------------------------------------------------------------ reconciliation helpers


def result_rows(rec: TrialRecord) -> list[dict[str, Any]]:
    """The trial's results, ``flatten``ed with ``/`` as Tune reports them."""
    return [flatten(r, sep="/") for r in rec.history]


def best_and_missing(rows: Sequence[Mapping[str, Any]], logged_steps: set, metric: str,
                     mode: str) -> tuple[BestSoFar, list[tuple]]:
    """The trial's best-so-far over all its results, and the metric values
    (``(key, value, timestamp ms, step)``) of the epochs not in ``logged_steps``."""
    best, missing = BestSoFar(metric, mode), []
    for row in rows:
        epoch = int(epoch_of(row))
        best.update(number(row.get(metric)), epoch)
        if epoch not in logged_steps:
            missing += _row_metrics(row, epoch)
    return best, missing


def reconciled_end(rec: TrialRecord, rows: Sequence[Mapping[str, Any]], best: BestSoFar,
                   max_epochs: Optional[int]) -> tuple[dict[str, str], list[tuple], str]:
    """(tags, metric values, MLflow run status) that end a run as its trial ended (KILLED
    when it did not), tagged as reconciled."""
    status_tag, run_status = _outcome(rec, rows, max_epochs)
    tags = {STATUS_TAG: status_tag, LAST_EPOCH_TAG: str(int(epoch_of(rows[-1]))) if rows else "0",
            RECONCILED_TAG: "true"}
    if rec.error:
        tags[ERROR_TAG] = clip_error(rec.error)
    # timestamped as the trial's last result: sent again, it is the same metric
    extra = best_metric_values(best, _row_ts(rows[-1]), best.step) if rows else []
    return tags, extra, run_status


def _row_metrics(row: Mapping[str, Any], epoch: int) -> list[tuple]:
    """The metrics of one Tune result row (``flatten``ed), timestamped as Tune reported it
    (so a row logged twice is the same metric)."""
    ts_ms = _row_ts(row)
    return [(k, x, ts_ms, epoch) for k, v in row.items()
            if is_trial_metric(k) and (x := not_nan(v)) is not None]


def _row_ts(row: Mapping[str, Any]) -> int:
    """A Tune result's time (its ``timestamp``, seconds) in milliseconds; 0 without one."""
    ts = not_nan(row.get("timestamp"))
    return int(ts * 1000) if ts is not None else 0


def _outcome(rec: TrialRecord, rows: Sequence[Mapping[str, Any]],
             max_epochs: Optional[int]) -> tuple[str, str]:
    """(cxrtune.status, MLflow run status) of a trial as Tune left it."""
    if rec.state == "ERROR":
        return FAILED, "FAILED"
    if rec.state != "TERMINATED":
        return KILLED, "KILLED"  # the search stopped before the trial ended
    if not rows:
        return NOT_STARTED, "KILLED"
    return ended_as(rows[-1], max_epochs), "FINISHED"
