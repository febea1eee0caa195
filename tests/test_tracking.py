"""MLflow tracking against a REAL `mlflow server` (and a local sqlite store).

The trial logger (what the Tune callback does) is driven directly with light stand-ins
for Tune trials (Ray is not started): what is under test is what lands in MLflow. The
server is stopped and started again on the same port and store to test outages.
"""

import json
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cxrtune.config import TrialConfig
from cxrtune.data.cxrnorm_config import CXRNormConfig
from cxrtune.models import ModelConfig, build_model
from cxrtune.serving.model import ModelPackage, Preprocessing, spec_of
from servers import MlflowServer, free_port
from cxrtune.tracking import (COMPLETED, ERROR_TAG, FAILED, FATAL, KILLED, LAST_EPOCH_TAG, RECONCILED_TAG,
                              REFUSED, STATUS_TAG, STOPPED_EARLY, TRANSIENT, TRIAL_ID_TAG, Tracker,
                              TrialLogger, TrialRecord, failure_kind)

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

LOGGER = "cxrtune.tracking"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free port (an ``MlflowServer``: it can be stopped and started
    again). Killed at teardown."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


def trial(tid: str, **config):
    return SimpleNamespace(trial_id=tid, config=config, error_file=None, last_result={},
                           get_error=lambda: None)


def result(epoch: int, f1: float, done: bool = False) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "train/loss": 1.0 / epoch, "val/loss": 0.9 / epoch,
            "val/f1_macro": f1, "lr": 1e-3, "best": f1, "best_epoch": epoch, "time/epoch_s": 0.5,
            "time_this_iter_s": 0.5, "done": done, "config": {"optimizer": {"lr": 1e-3}}}


def run_epochs(cb, t, f1s, done_last=False, early_stopped_last=False):
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    for i, f1 in enumerate(f1s, start=1):
        last = i == len(f1s)
        res = result(i, f1, done=done_last and last)
        if early_stopped_last and last:  # what the trial reports when its patience runs out
            res["early_stopped"] = 1.0
        cb.on_trial_result(iteration=i, trials=[t], trial=t, result=res)


def children(client, exp_id, parent_id):
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def steps(client, run_id, key="val/f1_macro"):
    """The steps ``key`` was logged at, in order, duplicates included."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


CLASSES = ("normal", "bacterial", "viral")


def convnet(tmp_path):
    """A tiny model (packaged as a search packages its best: network + spec) and its
    checkpoint folder, for log_best."""
    model = build_model(ModelConfig(backbone="convnet5"), 3, 32)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    torch.save({"model": model.state_dict(), "input_stats": (0.5, 0.25), "config": {"x": 1}},
               ckpt / "checkpoint.pt")
    prep = Preprocessing(task="three_class", classes=CLASSES, image_size=32, input_mean=0.5, input_std=0.25,
                         in_channels=1, cxrnorm=CXRNormConfig(clip_limit=2.0))
    return ModelPackage(model, spec_of(TrialConfig(model=ModelConfig(backbone="convnet5")), prep)), ckpt


# ---------------------------------------------------------------- no server


def test_unreachable_server_queues_and_says_exactly_what_was_not_logged(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    start = time.monotonic()
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "unreachable", final_wait_s=1)
    assert tracker.enabled and tracker.pending == 1  # the experiment waits for the server
    assert "not answering" in caplog.text and "queued" in caplog.text
    assert tracker.start_parent("search", {"a": 1, "b": 2}, {}, [], None) is None
    cb = tracker.trial_logger(metric="val/f1_macro", mode="max", max_epochs=2)
    t = trial("x_00000", lr=0.1)
    run_epochs(cb, t, [0.5, 0.6])
    cb.on_trial_complete(iteration=3, trials=[t], trial=t)
    assert tracker.log_best(None, "x_00000", {}, {}, {}, np.eye(2), ["a", "b"], None, None) is None
    tracker.end_parent(None)
    tracker.close()
    assert time.monotonic() - start < 30
    n_metrics = len([k for k in result(1, 0.5) if k.startswith(("train/", "val/", "time/")) or k in ("lr", "best")])
    assert tracker.not_logged() == {
        "experiment": {"experiment": 1},
        "parent run": {"run": 1, "params": 2, "tags": 1, "artifact": 2, "end": 1},
        "trial x_00000": {"run": 1, "params": 1, "metrics": 2 * n_metrics, "tags": 3, "end": 1}}
    report = [r.getMessage() for r in caplog.records if "were not logged" in r.getMessage()]
    assert len(report) == 1 and f"{tracker.skipped} MLflow writes were not logged" in report[0]
    assert "trial x_00000: the run itself, 1 params, 12 metric values, 3 tags, its end status" in report[0]
    # the fail-fast settings last as long as the tracker: then the user's own come back
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


def test_failures_are_told_apart():
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos import databricks_pb2 as codes

    assert failure_kind(MlflowException("API request to http://x failed with exception "
                                        "Max retries exceeded (Connection refused)")) == TRANSIENT
    assert failure_kind(MlflowException("busy", codes.TEMPORARILY_UNAVAILABLE)) == TRANSIENT
    assert failure_kind(RestException({"error_code": "INTERNAL_ERROR", "message": "500"})) == TRANSIENT
    assert failure_kind(ConnectionError("reset")) == TRANSIENT
    assert failure_kind(RestException({"error_code": "PERMISSION_DENIED", "message": "403"})) == FATAL
    assert failure_kind(MlflowException("who", codes.UNAUTHENTICATED)) == FATAL
    assert failure_kind(MlflowException("The experiment 3 must be in the 'active' state. Current state "
                                        "is deleted.", codes.INVALID_PARAMETER_VALUE)) == FATAL
    assert failure_kind(MlflowException("Changing param values is not allowed",
                                        codes.INVALID_PARAMETER_VALUE)) == REFUSED
    assert failure_kind(FileNotFoundError("gone.txt")) == REFUSED


def test_local_sqlite_store_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker()  # sqlite:///mlflow.db in the working directory
    assert tracker.enabled and tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracker.ui_command() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracker.start_parent("local", {"search": {"num_samples": 2}}, {"k": "v"}, [], None)
    cb = tracker.trial_logger(max_epochs=2)
    t = trial("loc_00000", optimizer={"lr": 0.01})
    run_epochs(cb, t, [0.4, 0.5])
    cb.on_trial_complete(iteration=3, trials=[t], trial=t)
    tracker.end_parent(parent)
    tracker.close()
    assert (tmp_path / "mlflow.db").is_file() and tracker.skipped == 0

    client = MlflowClient("sqlite:///mlflow.db")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.params["search.num_samples"] == "2"
    (child,) = children(client, run.info.experiment_id, parent)
    assert child.data.params == {"optimizer.lr": "0.01"}
    assert child.data.tags[STATUS_TAG] == COMPLETED
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val/f1_macro")] == [1, 2]


def test_a_failed_write_is_retried_at_once_and_tracking_stays_on(tmp_path, caplog):
    """A 503 (or a timeout) on one write: retried inline, nothing queued, nothing lost
    (today's code turned tracking off for the rest of the search)."""
    from mlflow.exceptions import MlflowException

    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "retry")
    parent = tracker.start_parent("retry", {}, {}, [], None)
    cb = tracker.trial_logger(max_epochs=2)
    real, failures = tracker._client.log_batch, []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise MlflowException("Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")
        return real(*args, **kwargs)

    tracker._client.log_batch = flaky
    t = trial("r_00000", lr=0.1)
    run_epochs(cb, t, [0.4, 0.5])
    cb.on_trial_complete(iteration=3, trials=[t], trial=t)
    tracker.end_parent(parent)
    tracker.close()
    assert failures and tracker.enabled and tracker.skipped == 0 and tracker.not_logged() == {}
    assert "not answering" not in caplog.text
    client = MlflowClient(tracker.uri)
    (child,) = children(client, tracker.experiment_id, parent)
    assert child.data.params == {"lr": "0.1"} and steps(client, child.info.run_id) == [1, 2]


def test_a_deleted_experiment_makes_the_tracker_give_up(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "doomed", final_wait_s=1)
    tracker.start_parent("doomed", {}, {}, [], None)
    cb = tracker.trial_logger(max_epochs=3)
    t = trial("d_00000", lr=0.1)
    run_epochs(cb, t, [0.4])
    MlflowClient(tracker.uri).delete_experiment(tracker.experiment_id)  # by someone, mid-search
    start = time.monotonic()
    for epoch in (2, 3):
        cb.on_trial_result(iteration=epoch, trials=[t], trial=t, result=result(epoch, 0.5))
    cb.on_trial_complete(iteration=4, trials=[t], trial=t)
    tracker.end_parent(None)
    tracker.close()
    assert time.monotonic() - start < 10  # no retrying of what a retry cannot fix
    assert not tracker.enabled
    gave_up = [r.getMessage() for r in caplog.records if "gave up while" in r.getMessage()]
    assert len(gave_up) == 1 and "the experiment 'doomed' was deleted" in gave_up[0]
    assert tracker.not_logged()["trial d_00000"] == {"metrics": 12, "tags": 2, "end": 1}
    assert "trial d_00000: 12 metric values, 2 tags, its end status" in caplog.text


def test_best_so_far_follows_the_metric_direction(tmp_path):
    """``best/<metric>`` comes from selection.BestSoFar: a loss is minimised without a mode
    being given, NaN never counts, and ties keep the earlier epoch."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "direction")
    parent = tracker.start_parent("direction", {}, {}, [], None)
    cb = tracker.trial_logger(metric="val/loss", max_epochs=4)
    assert isinstance(cb, TrialLogger) and cb.mode == "min"
    t = trial("l_00000", lr=0.1)
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    for epoch, loss in enumerate([0.9, 0.4, math.nan, 0.4], start=1):
        cb.on_trial_result(iteration=epoch, trials=[t], trial=t, result={"epoch": epoch, "val/loss": loss})
    cb.on_trial_complete(iteration=5, trials=[t], trial=t)
    tracker.close()
    client = MlflowClient(tracker.uri)
    (child,) = children(client, tracker.experiment_id, parent)
    (best,) = client.get_metric_history(child.info.run_id, "best/val/loss")
    assert best.value == 0.4 and cb._best["l_00000"].step == 2


def test_runs_of_trials_lost_with_a_killed_driver_are_dropped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker()
    parent = tracker.start_parent("lost", {}, {}, [], None)
    cb = tracker.trial_logger(max_epochs=2, params_of=lambda c: c["point"])
    for tid in ("keep_1", "keep_2", "lost_3"):
        t = trial(tid, point={"lr": 0.1})
        cb.on_trial_start(iteration=0, trials=[t], trial=t)
    assert tracker.drop_orphan_children(["keep_1", "keep_2"]) == 1
    kids = children(MlflowClient(tracker.uri), tracker.experiment_id, parent)
    assert sorted(k.data.tags[TRIAL_ID_TAG] for k in kids) == ["keep_1", "keep_2"]
    assert kids[0].data.params == {"lr": "0.1"}  # params_of picked the searched point
    tracker.close()


def rows(*f1s, done_at=None):
    """A trial's result history as Tune keeps it (one row per epoch)."""
    return [{**result(i, f1), "timestamp": 1_700_000_000 + i} for i, f1 in enumerate(f1s, start=1)]


def test_reconcile_logs_what_tune_knows_and_mlflow_missed(tmp_path):
    """--resume after an outage (or a killed driver): trials never logged get their run,
    params, every epoch and status; runs left RUNNING are closed; nothing twice."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "reconcile")
    parent = tracker.start_parent("reconcile", {}, {}, [], None)
    cb = tracker.trial_logger(max_epochs=3)
    done = trial("a_00000", lr=0.1)  # fully logged
    run_epochs(cb, done, [0.5, 0.6, 0.7])
    cb.on_trial_complete(iteration=4, trials=[done], trial=done)
    cut = trial("b_00001", lr=0.2)  # the driver died after its first epoch
    run_epochs(cb, cut, [0.4])
    tracker.close()

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "reconcile")  # the resumed driver
    assert tracker.start_parent("reconcile", {}, {}, [], existing_run_id=parent) == parent
    tracker.reconcile([
        TrialRecord("a_00000", {"lr": 0.1}, rows(0.5, 0.6, 0.7), "TERMINATED"),
        TrialRecord("b_00001", {"lr": 0.2}, rows(0.4, 0.45, 0.3), "TERMINATED"),
        TrialRecord("c_00002", {"lr": 9.0}, rows(0.1), "ERROR", "TrainingDiverged: loss became nan"),
        TrialRecord("d_00003", {"lr": 0.3}, rows(0.2), "PAUSED"),
    ], metric="val/f1_macro", mode="max", max_epochs=3)
    tracker.end_parent(parent)
    tracker.close()
    assert tracker.skipped == 0

    client = MlflowClient(tracker.uri)
    kids = {k.data.tags[TRIAL_ID_TAG]: k for k in children(client, tracker.experiment_id, parent)}
    assert sorted(kids) == ["a_00000", "b_00001", "c_00002", "d_00003"]
    a, b, c, d = (kids[k] for k in sorted(kids))
    assert steps(client, a.info.run_id) == [1, 2, 3] and RECONCILED_TAG not in a.data.tags
    assert steps(client, b.info.run_id) == [1, 2, 3] and steps(client, b.info.run_id, "train/loss") == [1, 2, 3]
    assert (b.info.status, b.data.tags[STATUS_TAG], b.data.tags[LAST_EPOCH_TAG]) == ("FINISHED", COMPLETED, "3")
    assert b.data.tags[RECONCILED_TAG] == "true" and b.data.metrics["best/val/f1_macro"] == 0.45
    assert c.data.params == {"lr": "9.0"} and steps(client, c.info.run_id) == [1]
    assert (c.info.status, c.data.tags[STATUS_TAG]) == ("FAILED", FAILED)
    assert "TrainingDiverged" in c.data.tags[ERROR_TAG]
    assert (d.info.status, d.data.tags[STATUS_TAG]) == ("KILLED", KILLED)


def test_model_is_logged_in_the_search_experiment_not_default(tmp_path):
    """MLflow's sqlite store creates experiment 0 "Default" itself when it creates its
    tables (SqlAlchemyStore.__init__), so it exists in every fresh store: it must stay
    empty, no runs and no logged models; the model belongs to the search's experiment."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    tracker = Tracker(uri, "cxr-models")
    parent = tracker.start_parent("models", {"a": 1}, {}, [], None)
    package, ckpt = convnet(tmp_path)
    model_uri = tracker.log_best(parent, "t_00000", {"lr": 0.1}, {"val/f1_macro": 0.8}, {"f1_macro": 0.7},
                                 np.eye(3), list(CLASSES), ckpt, package)
    tracker.end_parent(parent)
    tracker.close()
    assert model_uri and tracker.skipped == 0
    client = MlflowClient(uri)
    exps = {e.name: e.experiment_id for e in client.search_experiments()}
    assert set(exps) == {"cxr-models", "Default"} and exps["Default"] == "0"
    assert client.search_runs(["0"]) == [] and client.search_logged_models(["0"]) == []
    (logged,) = client.search_logged_models([exps["cxr-models"]])
    assert logged.source_run_id == parent and model_uri == f"models:/{logged.model_id}"
    assert "READY" in str(logged.status)


def test_versions_fall_back_to_mlflow_skinny(monkeypatch):
    import importlib.metadata as md

    from cxrtune.search import _versions

    real = md.version

    def version(name):
        if name == "mlflow":
            raise md.PackageNotFoundError(name)
        return "3.99.0" if name == "mlflow-skinny" else real(name)

    monkeypatch.setattr(md, "version", version)
    assert _versions()["mlflow"] == "3.99.0"


def test_tracking_keeps_no_global_registry_and_needs_no_ray():
    import cxrtune.tracking as tracking

    assert not hasattr(tracking, "_LIVE") and not hasattr(tracking, "__getattr__")
    code = "import sys, cxrtune.tracking; assert 'ray' not in sys.modules and 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _noop_trainable(config):
    pass


def test_restored_tuner_callbacks_get_the_live_tracker(tmp_path):
    """Tuner pickles its callbacks into tuner.pkl; Tuner.restore unpickles them without a
    tracker, and the driver attaches its live one (no global registry)."""
    from ray import tune

    from cxrtune.search import MlflowCallback, point_of

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "restore")
    tracker.start_parent("restore", {}, {}, [], None)
    cb = MlflowCallback(tracker.trial_logger(max_epochs=2, params_of=point_of))
    tune.Tuner(_noop_trainable, run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path / "ray"),
                                                          callbacks=[cb]))
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "exp"), _noop_trainable)
    (rcb,) = restored._local_tuner.get_run_config().callbacks
    assert isinstance(rcb, MlflowCallback) and rcb is not cb and rcb.logger.tracker is None
    assert MlflowCallback.attach_restored(restored, tracker) == 1 and rcb.logger.tracker is tracker
    t = trial("p_00000", point={"lr": 0.5})
    rcb.on_trial_start(iteration=0, trials=[t], trial=t)
    rcb.on_trial_result(iteration=1, trials=[t], trial=t, result=result(1, 0.5))
    tracker.close()
    (child,) = children(MlflowClient(tracker.uri), tracker.experiment_id, tracker.parent_id)
    assert child.data.params == {"lr": "0.5"}


# ---------------------------------------------------------------- real server


def test_search_is_logged_to_server(server, tmp_path, caplog):
    uri = server.uri
    caplog.set_level(logging.WARNING, logger=LOGGER)
    exp = "cxr-search"
    config_file = tmp_path / "search.yaml"
    config_file.write_text("num_samples: 4\n")
    tracker = Tracker(uri, exp)
    assert tracker.enabled and tracker.ui_command() == f"open {uri}"
    parent = tracker.start_parent("search-1", {"search": {"num_samples": 4, "scheduler": "asha"}},
                                  {"cxrtune.kind": "search"}, [config_file], None)
    assert parent
    from ray.tune import Callback

    from cxrtune.search import MlflowCallback

    cb = MlflowCallback(tracker.trial_logger(metric="val/f1_macro", mode="max", max_epochs=3))
    assert isinstance(cb, Callback)

    full = trial("t_00000", optimizer={"lr": 1e-3, "name": "adam"}, model={"backbone": "convnet5"},
                 sizes=[1, 2])
    run_epochs(cb, full, [0.5, 0.7, 0.6])
    cb.on_trial_complete(iteration=4, trials=[full], trial=full)

    asha = trial("t_00001", optimizer={"lr": 1e-1, "name": "sgd"})
    run_epochs(cb, asha, [0.3], done_last=True)  # Tune marks the result done when ASHA stops it
    cb.on_trial_complete(iteration=5, trials=[asha], trial=asha)

    patience = trial("t_00002", optimizer={"lr": 1e-2, "name": "adam"})
    run_epochs(cb, patience, [0.6, 0.55], early_stopped_last=True)  # its own early stopping, before epoch 3
    cb.on_trial_complete(iteration=6, trials=[patience], trial=patience)

    broken = trial("t_00003", optimizer={"lr": 10.0, "name": "sgd"})
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1 (occurred at 2026-01-01)\n" + "  File x.py, line 1\n" * 60
                   + "TrainingDiverged: loss became nan at epoch 1 batch 3\n")
    broken.error_file = str(err)
    run_epochs(cb, broken, [0.1])
    cb.on_trial_error(iteration=7, trials=[broken], trial=broken)

    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(exp).experiment_id
    runs = {r.data.tags[TRIAL_ID_TAG]: r for r in children(client, exp_id, parent)}
    assert set(runs) == {"t_00000", "t_00001", "t_00002", "t_00003"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs.values())
    assert runs["t_00000"].data.params == {"optimizer.lr": "0.001", "optimizer.name": "adam",
                                           "model.backbone": "convnet5", "sizes": "[1, 2]"}
    hist = client.get_metric_history(runs["t_00000"].info.run_id, "val/f1_macro")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 0.5), (2, 0.7), (3, 0.6)]
    logged = set(runs["t_00000"].data.metrics)
    assert {"train/loss", "val/loss", "lr", "best", "time/epoch_s", "best/val/f1_macro"} <= logged
    assert not logged & {"best_epoch", "time_this_iter_s", "epoch", "done", "config/optimizer/lr"}
    assert runs["t_00000"].data.metrics["best/val/f1_macro"] == 0.7
    status = {k: (r.data.tags[STATUS_TAG], r.info.status, r.data.tags[LAST_EPOCH_TAG]) for k, r in runs.items()}
    assert status == {"t_00000": (COMPLETED, "FINISHED", "3"), "t_00001": (STOPPED_EARLY, "FINISHED", "1"),
                      "t_00002": (COMPLETED, "FINISHED", "2"), "t_00003": (FAILED, "FAILED", "1")}
    error = runs["t_00003"].data.tags[ERROR_TAG]
    assert error.startswith("Failure # 1") and "TrainingDiverged: loss became nan" in error
    assert len(error) <= 500
    assert "search.yaml" in [a.path for a in client.list_artifacts(parent)]
    assert tracker.skipped == 0 and "refused" not in caplog.text

    # --- the driver restarts (--resume): a new Tracker reopens the same parent, Tuner.restore
    # unpickles the callback (without a tracker) and the driver attaches the new one; a trial
    # started again gets its existing run back, no duplicate.
    state = pickle.dumps(cb)
    tracker.close()
    tracker2 = Tracker(uri, exp)
    assert tracker2.start_parent("search-1", {"search": {"num_samples": 4, "scheduler": "asha"}},
                                 {}, [], existing_run_id=parent) == parent
    cb2 = pickle.loads(state)
    assert cb2.logger.tracker is None
    cb2.logger.attach(tracker2)
    asha.config = {"optimizer": {"lr": 1e-1, "name": "sgd"}}
    cb2.on_trial_start(iteration=0, trials=[asha], trial=asha)
    cb2.on_trial_result(iteration=1, trials=[asha], trial=asha, result=result(2, 0.4))
    cb2.on_trial_result(iteration=2, trials=[asha], trial=asha, result=result(3, 0.45))
    cb2.on_trial_complete(iteration=3, trials=[asha], trial=asha)
    fresh = tracker2.trial_logger(max_epochs=3)
    late = trial("t_00004", optimizer={"lr": 3e-3, "name": "adam"})
    run_epochs(fresh, late, [0.2, 0.3, 0.8])
    fresh.on_trial_complete(iteration=4, trials=[late], trial=late)
    runs = {}
    for r in children(client, exp_id, parent):
        assert r.data.tags[TRIAL_ID_TAG] not in runs, "duplicate child run"
        runs[r.data.tags[TRIAL_ID_TAG]] = r
    assert len(runs) == 5 and client.get_run(parent).info.status == "RUNNING"
    resumed = runs["t_00001"]
    assert resumed.data.tags[STATUS_TAG] == COMPLETED and resumed.data.tags[LAST_EPOCH_TAG] == "3"
    assert resumed.data.metrics["best/val/f1_macro"] == 0.45
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val/f1_macro")] == [1, 2, 3]
    assert len(client.search_runs([exp_id], filter_string="tags.`cxrtune.role` = 'search'")) == 1

    # --- the best trial on the parent run
    package, ckpt = convnet(tmp_path)
    confusion = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    model_uri = tracker2.log_best(parent, "t_00004", {"optimizer": {"lr": 3e-3, "name": "adam"}},
                                  {"val/f1_macro": 0.8, "val/loss": 0.3}, {"test/f1_macro": 0.75, "accuracy": 0.79},
                                  confusion, list(CLASSES), ckpt, package, register_name="cxr-best")
    assert model_uri and model_uri.startswith("models:/")
    tracker2.end_parent(parent, status="FINISHED")
    tracker2.close()
    assert tracker2.skipped == 0, caplog.text

    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.params["best/optimizer.lr"] == "0.003"
    assert run.data.metrics["best/val/f1_macro"] == 0.8 and run.data.metrics["test/f1_macro"] == 0.75
    assert run.data.metrics["test/accuracy"] == 0.79
    assert run.data.tags["cxrtune.best_trial_id"] == "t_00004"
    assert run.data.tags["cxrtune.registered_model"] == "cxr-best/1"
    assert client.get_run(runs["t_00004"].info.run_id).data.tags["cxrtune.best"] == "true"
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"confusion_matrix.json", "confusion_matrix.png", "preprocessing.json", "best_checkpoint"} <= arts
    assert [a.path for a in client.list_artifacts(parent, "best_checkpoint")] == ["best_checkpoint/checkpoint.pt"]
    got = Path(client.download_artifacts(parent, "confusion_matrix.json", str(tmp_path)))
    assert '"matrix"' in got.read_text() and "bacterial" in got.read_text()
    png = Path(client.download_artifacts(parent, "confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the model belongs to the search's experiment; Default (made by the server's store) stays empty
    (logged,) = client.search_logged_models([exp_id])
    assert model_uri == f"models:/{logged.model_id}" and logged.source_run_id == parent
    assert client.search_logged_models(["0"]) == [] and client.search_runs(["0"]) == []
    (version,) = client.search_model_versions("name='cxr-best'")
    assert version.version == "1" and version.run_id == parent and version.source == model_uri
    prep = json.loads(Path(client.download_artifacts(parent, "preprocessing.json", str(tmp_path))).read_text())
    assert prep == package.spec.preprocessing.to_dict() and prep["cxrnorm"]["clip_limit"] == 2.0
    # the registered model is a pyfunc model that carries its preprocessing, no pickled network
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    with _use_tracking_uri(uri):
        info = mlflow.models.get_model_info(model_uri)
        assert "pytorch" not in info.flavors and info.flavors["python_function"]["artifacts"]
        assert info.metadata["preprocessing"]["classes"] == list(CLASSES)
        assert info.metadata["preprocessing"]["input_mean"] == 0.5
        assert {c.name for c in info.signature.outputs.inputs} == {*CLASSES, "predicted"}
        loaded = mlflow.pyfunc.load_model("models:/cxr-best/1")
    served = loaded.unwrap_python_model().classifier
    x = torch.randn(2, 1, 32, 32)
    package.model.eval()
    assert not served.model.training and torch.equal(served.model(x), package.model(x))
    answer = loaded.predict(pd.DataFrame({"image": [np.full((40, 50), 7, np.uint16), np.eye(40, dtype=np.uint8)]}))
    assert list(answer.columns) == [*CLASSES, "predicted"] and len(answer) == 2
    assert np.allclose(answer[list(CLASSES)].sum(axis=1), 1, atol=1e-6)




def test_server_restarted_mid_search_everything_is_logged_once(server, caplog):
    """The server dies mid-search (SIGKILL) and comes back on the same port and store:
    what was logged meanwhile (runs created, params, metrics, tags, terminations) is
    queued and sent, in the same parent, each metric once; the parent ends FINISHED."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    tracker = Tracker(server.uri, "cxr-outage", timeout_s=2, final_wait_s=60)
    parent = tracker.start_parent("outage", {"a": 1}, {}, [], None)
    cb = tracker.trial_logger(max_epochs=3)
    first = trial("o_00000", optimizer={"lr": 0.1})
    run_epochs(cb, first, [0.5])
    assert tracker.pending == 0 and tracker.skipped == 0

    server.stop()
    start = time.monotonic()
    for epoch in (2, 3):
        cb.on_trial_result(iteration=epoch, trials=[first], trial=first, result=result(epoch, 0.6 + epoch / 100))
    cb.on_trial_complete(iteration=4, trials=[first], trial=first)
    second = trial("o_00001", optimizer={"lr": 0.2})  # its run is created while the server is down
    run_epochs(cb, second, [0.1, 0.2])
    assert time.monotonic() - start < 10  # the search does not wait for the server
    assert tracker.pending > 0 and tracker.enabled
    cb.on_trial_result(iteration=3, trials=[second], trial=second, result=result(3, 0.3))
    restart = threading.Thread(target=server.start)  # back on the same port and store
    restart.start()
    while restart.is_alive():  # the search goes on meanwhile: each trial event tries the queue
        tracker.poll()
        time.sleep(0.5)
    restart.join()
    cb.on_trial_complete(iteration=5, trials=[second], trial=second)
    third = trial("o_00002", optimizer={"lr": 9.0})
    run_epochs(cb, third, [0.05])
    cb.on_trial_error(iteration=6, trials=[third], trial=third)
    tracker.end_parent(parent, status="FINISHED")
    tracker.close()
    assert tracker.skipped == 0 and tracker.not_logged() == {}, caplog.text
    down = [r for r in caplog.records if "not answering" in r.getMessage()]
    assert len(down) == 1 and down[0].levelno == logging.WARNING
    assert any("answers again" in r.getMessage() for r in caplog.records)

    client = MlflowClient(server.uri)
    assert client.get_run(parent).info.status == "FINISHED"
    kids = {}
    for k in children(client, tracker.experiment_id, parent):
        assert k.data.tags[TRIAL_ID_TAG] not in kids, "duplicate child run"
        kids[k.data.tags[TRIAL_ID_TAG]] = k
    assert sorted(kids) == ["o_00000", "o_00001", "o_00002"]
    a, b, c = (kids[k] for k in sorted(kids))
    for run, expect in ((a, [1, 2, 3]), (b, [1, 2, 3]), (c, [1])):
        for key in ("val/f1_macro", "train/loss", "lr"):
            assert steps(client, run.info.run_id, key) == expect, (run.data.tags[TRIAL_ID_TAG], key)
    assert b.data.params == {"optimizer.lr": "0.2"}
    assert (a.info.status, a.data.tags[STATUS_TAG], a.data.metrics["best/val/f1_macro"]) == ("FINISHED", COMPLETED, 0.63)
    assert (b.info.status, b.data.tags[STATUS_TAG], b.data.tags[LAST_EPOCH_TAG]) == ("FINISHED", COMPLETED, "3")
    assert (c.info.status, c.data.tags[STATUS_TAG]) == ("FAILED", FAILED)
