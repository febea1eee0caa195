"""MLflow tracking of a search: one parent run, one nested child run per Tune trial.

This is the only package of cxrtune that writes to MLflow (importing it costs nothing:
MLflow is imported lazily; ``cxrtune.serving`` reads models back), and it imports no Ray: ``TrialLogger`` holds what the driver-side Tune
callback does, and search.py's small ``ray.tune.Callback`` delegates to it.

Tracking never stops a search, and it recovers from outages: every MLflow write goes
through one retrying, queueing ``Writer`` (writer.py: retried at once, queued in order
while the server is down and sent when it answers, dropped with a warning when the
server refuses it, given up on when no retry can fix it). ``Tracker.close()`` says
exactly what was not logged (which runs, how many params, metric values, tags), and
``Tracker.not_logged()`` returns it.

Modules: ``common`` (tags, statuses, value conversions), ``writer`` (the retrying
queue), ``tracker`` (the ``Tracker``: the experiment, parent and child runs,
reconciliation, the best model and its registration), ``trials`` (``TrialLogger``,
``TrialRecord`` and how a trial's results read). The figures it logs are drawn by
``cxrtune.report``.
"""

from .common import (COMPLETED, DEFAULT_EXPERIMENT, DEFAULT_URI, ERROR_CHARS, ERROR_TAG, FAILED, KILLED,
                     LAST_EPOCH_TAG, METRIC_KEYS, METRIC_PREFIXES, NOT_STARTED, PARENT_TAG, RECONCILED_TAG,
                     REGISTERED_TAG, ROLE_TAG, RUNNING, STATUS_TAG, STOPPED_EARLY, TRIAL_ID_TAG, BEST_TRIAL_TAG,
                     flatten, param_value)
from .tracker import DEFAULT_FINAL_WAIT_S, WAIT_ENV, RunLike, Tracker, using_tracking_uri
from .trials import TrialLogger, TrialRecord, ended_as, error_text
from .writer import DONE, FATAL, LOST, REFUSED, TRANSIENT, WAIT, describe_not_logged, failure_kind

__all__ = ["Tracker", "TrialLogger", "using_tracking_uri", "TrialRecord", "DEFAULT_URI", "DEFAULT_EXPERIMENT", "flatten",
           "param_value", "failure_kind", "describe_not_logged", "error_text", "TRIAL_ID_TAG", "STATUS_TAG",
           "LAST_EPOCH_TAG", "ERROR_TAG", "RECONCILED_TAG", "COMPLETED", "STOPPED_EARLY", "FAILED",
           "KILLED", "RUNNING",
           # also importable from here, as from the single module this package was
           "NOT_STARTED", "ended_as", "ROLE_TAG", "BEST_TRIAL_TAG", "REGISTERED_TAG", "PARENT_TAG",
           "METRIC_PREFIXES", "METRIC_KEYS", "ERROR_CHARS", "WAIT_ENV", "DEFAULT_FINAL_WAIT_S", "RunLike",
           "DONE", "WAIT", "LOST", "TRANSIENT", "REFUSED", "FATAL"]
