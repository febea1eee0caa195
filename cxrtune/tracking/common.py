"""What every module of the tracking package shares: the tags and statuses the runs
carry, MLflow's limits, and how values become what MLflow stores."""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from typing import Any, Iterable, Mapping, Optional

# One logger for the package, named as the single module was ("cxrtune.tracking").
log = logging.getLogger(__package__)

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
RECONCILED_TAG = "cxrtune.reconciled"  # written after the fact from Tune's results (reconcile)
PARENT_TAG = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID

COMPLETED, STOPPED_EARLY, FAILED, RUNNING = "completed", "stopped_early", "failed", "running"
KILLED, NOT_STARTED = "killed", "not_started"

METRIC_PREFIXES = ("train/", "val/", "time/", "cost/", "cv/")
METRIC_KEYS = ("lr", "best")
ERROR_CHARS = 500  # of a failed trial's error kept in the cxrtune.error tag

# MLflow limits (mlflow.utils.validation): params per batch, param value length.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000


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


def number(v: Any) -> Optional[float]:
    """``v`` as a float when it is a real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def not_nan(v: Any) -> Optional[float]:
    """``number(v)``, None for NaN too."""
    x = number(v)
    return None if x is None or math.isnan(x) else x


def is_trial_metric(key: str) -> bool:
    """Whether a (flattened) Tune result key is a metric a trial's run logs."""
    return key.startswith(METRIC_PREFIXES) or key in METRIC_KEYS


def jsonable(obj: Any) -> Any:
    """Plain JSON data (numpy scalars/arrays, tuples, Paths made plain)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def short(exc: BaseException, n: int = 300) -> str:
    """A one-line reason; for connection failures just the socket error."""
    s = " ".join(f"{type(exc).__name__}: {exc}".split())
    m = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out[^'\")]*|Connection refused", s)
    if m and "Max retries exceeded" in s:
        return f"cannot connect: {m.group(0).strip()}"
    return s if len(s) <= n else s[:n] + "..."


def metric_entities(items: Iterable[tuple]) -> list:
    """``(key, value, timestamp ms, step)`` tuples as MLflow ``Metric``s."""
    from mlflow.entities import Metric

    return [Metric(*item) for item in items]


def run_tags(tags: Mapping[str, Any]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(str(k), str(v)) for k, v in tags.items()]
