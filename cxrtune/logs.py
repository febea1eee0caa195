"""What the terminal shows: cxrtune's own progress, and other libraries' messages only
when a user can act on them. ``--verbose`` shows everything again."""

from __future__ import annotations

import logging
import os
import sys

# Loggers whose INFO lines (and a few warnings) say nothing a user can act on: a line
# per checkpoint, "a new study created", model-registry chatter, the check of the
# logged model's input example.
QUIET_LOGGERS = {
    "ray.train": logging.WARNING,
    "ray.tune": logging.WARNING,
    "optuna": logging.WARNING,
    "mlflow": logging.ERROR,
    "alembic": logging.WARNING,
}
# Notices that name no problem: Ray's note that the local Ray it started has token
# authentication on (the secure default, nothing to do), and Tune's "experiment state
# snapshotting triggered multiple times" for short epochs, which cxrtune's checkpointing
# (keep_checkpoints) causes by design.
QUIET_MESSAGES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
}
QUIET_ENVIRONMENT = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(verbose: bool) -> None:
    """Set up logging for a command: cxrtune at INFO (DEBUG with ``verbose``), other
    libraries at WARNING or quieter (INFO with ``verbose``)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("cxrtune").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ["CXRTUNE_VERBOSE"] = "1" if verbose else "0"  # read again in trial processes
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Silence the chatter of QUIET_LOGGERS (called again once a search has imported
    Optuna, and in each trial's process)."""
    if os.environ.get("CXRTUNE_VERBOSE") == "1":
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, start in QUIET_MESSAGES.items():
        _drop_messages(logging.getLogger(name), start)
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # MLflow and Optuna set their loggers' levels themselves when first used; MLflow
    # reads its level from the environment, Optuna's is set once it is imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(QUIET_LOGGERS["mlflow"]))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "optuna" in sys.modules:
        sys.modules["optuna"].logging.set_verbosity(QUIET_LOGGERS["optuna"])


class _DropStartingWith(logging.Filter):
    """Drops the records whose message starts with ``start``."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def _drop_messages(logger: logging.Logger, start: str) -> None:
    if not any(isinstance(f, _DropStartingWith) and f.start == start for f in logger.filters):
        logger.addFilter(_DropStartingWith(start))
