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
    # MLflow and Optuna set their loggers' levels themselves when first used; MLflow
    # reads its level from the environment, Optuna's is set once it is imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(QUIET_LOGGERS["mlflow"]))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "optuna" in sys.modules:
        sys.modules["optuna"].logging.set_verbosity(QUIET_LOGGERS["optuna"])
