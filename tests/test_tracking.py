"""MLflow tracking against a REAL `mlflow server` (and a local sqlite store).

The Tune callback is driven directly with light stand-ins for Tune trials (Ray is
not started): what is under test is what lands in MLflow.
"""

import logging
import os
import pickle
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cxrtune.models import ModelConfig, build_model
from servers import free_port, kill_group, mlflow_server
from cxrtune.tracking import (COMPLETED, ERROR_TAG, FAILED, LAST_EPOCH_TAG, STATUS_TAG, STOPPED_EARLY,
                              TRIAL_ID_TAG, Tracker)

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

LOGGER = "cxrtune.tracking"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free port: (uri, process). Killed at teardown."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as (uri, proc):
        yield uri, proc


def trial(tid: str, **config):
    return SimpleNamespace(trial_id=tid, config=config, error_file=None, last_result={},
                           get_error=lambda: None)


def result(epoch: int, f1: float, done: bool = False) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "train/loss": 1.0 / epoch, "val/loss": 0.9 / epoch,
            "val/f1_macro": f1, "lr": 1e-3, "best": f1, "best_epoch": epoch, "time/epoch_s": 0.5,
            "time_this_iter_s": 0.5, "done": done, "config": {"optimizer": {"lr": 1e-3}}}


def run_epochs(cb, t, f1s, done_last=False):
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    for i, f1 in enumerate(f1s, start=1):
        cb.on_trial_result(iteration=i, trials=[t], trial=t,
                           result=result(i, f1, done=done_last and i == len(f1s)))


def children(client, exp_id, parent_id):
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


# ---------------------------------------------------------------- no server


def test_unreachable_server_turns_tracking_off(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    start = time.monotonic()
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "unreachable")
    assert not tracker.enabled
    assert "unreachable" in caplog.text and "tracking is OFF" in caplog.text
    assert tracker.start_parent("search", {"a": 1}, {}, [], None) is None
    cb = tracker.callback(metric="val/f1_macro", mode="max", max_epochs=2)
    t = trial("x_00000", lr=0.1)
    run_epochs(cb, t, [0.5, 0.6])
    cb.on_trial_complete(iteration=3, trials=[t], trial=t)
    assert tracker.log_best(None, "x_00000", {}, {}, {}, np.eye(2), ["a", "b"], None, None, {}) is None
    tracker.end_parent(None)
    assert tracker.skipped > 0
    tracker.close()
    assert "MLflow calls were not logged" in caplog.text
    assert time.monotonic() - start < 30
    # the fail-fast settings last as long as the tracker: then the user's own come back
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


def test_local_sqlite_store_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker()  # sqlite:///mlflow.db in the working directory
    assert tracker.enabled and tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracker.ui_command() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracker.start_parent("local", {"search": {"num_samples": 2}}, {"k": "v"}, [], None)
    cb = tracker.callback(max_epochs=2)
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


def test_runs_of_trials_lost_with_a_killed_driver_are_dropped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker()
    parent = tracker.start_parent("lost", {}, {}, [], None)
    cb = tracker.callback(max_epochs=2, params_of=lambda c: c["point"])
    for tid in ("keep_1", "keep_2", "lost_3"):
        t = trial(tid, point={"lr": 0.1})
        cb.on_trial_start(iteration=0, trials=[t], trial=t)
    assert tracker.drop_orphan_children(["keep_1", "keep_2"]) == 1
    kids = children(MlflowClient(tracker.uri), tracker.experiment_id, parent)
    assert sorted(k.data.tags[TRIAL_ID_TAG] for k in kids) == ["keep_1", "keep_2"]
    assert kids[0].data.params == {"lr": "0.1"}  # params_of picked the searched point
    tracker.close()


# ---------------------------------------------------------------- real server


def test_search_is_logged_to_server(server, tmp_path, caplog):
    uri, _ = server
    caplog.set_level(logging.WARNING, logger=LOGGER)
    exp = "cxr-search"
    config_file = tmp_path / "search.yaml"
    config_file.write_text("num_samples: 4\n")
    tracker = Tracker(uri, exp)
    assert tracker.enabled and tracker.ui_command() == f"open {uri}"
    parent = tracker.start_parent("search-1", {"search": {"num_samples": 4, "scheduler": "asha"}},
                                  {"cxrtune.kind": "search"}, [config_file], None)
    assert parent
    cb = tracker.callback(metric="val/f1_macro", mode="max", max_epochs=3, parent_run_id=parent)
    from ray.tune import Callback
    assert isinstance(cb, Callback)

    full = trial("t_00000", optimizer={"lr": 1e-3, "name": "adam"}, model={"backbone": "convnet5"},
                 sizes=[1, 2])
    run_epochs(cb, full, [0.5, 0.7, 0.6])
    cb.on_trial_complete(iteration=4, trials=[full], trial=full)

    asha = trial("t_00001", optimizer={"lr": 1e-1, "name": "sgd"})
    run_epochs(cb, asha, [0.3], done_last=True)  # Tune marks the result done when ASHA stops it
    cb.on_trial_complete(iteration=5, trials=[asha], trial=asha)

    patience = trial("t_00002", optimizer={"lr": 1e-2, "name": "adam"})
    run_epochs(cb, patience, [0.6, 0.55])  # its own early stopping: ends by itself before epoch 3
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
    # unpickles the callback; a trial started again gets its existing run back, no duplicate.
    state = pickle.dumps(cb)
    tracker.close()
    tracker2 = Tracker(uri, exp)
    assert tracker2.start_parent("search-1", {"search": {"num_samples": 4, "scheduler": "asha"}},
                                 {}, [], existing_run_id=parent) == parent
    cb2 = pickle.loads(state)
    assert cb2.tracker is tracker2
    asha.config = {"optimizer": {"lr": 1e-1, "name": "sgd"}}
    cb2.on_trial_start(iteration=0, trials=[asha], trial=asha)
    cb2.on_trial_result(iteration=1, trials=[asha], trial=asha, result=result(2, 0.4))
    cb2.on_trial_result(iteration=2, trials=[asha], trial=asha, result=result(3, 0.45))
    cb2.on_trial_complete(iteration=3, trials=[asha], trial=asha)
    fresh = tracker2.callback(max_epochs=3)
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
    model = build_model(ModelConfig(backbone="convnet5"), 3, 32)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    torch.save({"model": model.state_dict(), "input_stats": (0.5, 0.25), "config": {"x": 1}},
               ckpt / "checkpoint.pt")
    prep = {"cxrnorm": {"method": "cxrnorm", "clip_limit": 2.0}, "input_size": 32, "in_channels": 1,
            "mean": np.float32(0.5), "std": 0.25, "class_names": ["normal", "bacterial", "viral"],
            "task": "three_class"}
    confusion = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    model_uri = tracker2.log_best(parent, "t_00004", {"optimizer": {"lr": 3e-3, "name": "adam"}},
                                  {"val/f1_macro": 0.8, "val/loss": 0.3}, {"test/f1_macro": 0.75, "accuracy": 0.79},
                                  confusion, ["normal", "bacterial", "viral"], ckpt, model, prep,
                                  register_name="cxr-best")
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

    (version,) = client.search_model_versions("name='cxr-best'")
    assert version.version == "1" and version.run_id == parent and version.source == model_uri
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    with _use_tracking_uri(uri):
        info = mlflow.models.get_model_info(model_uri)
        assert info.metadata["preprocessing"]["class_names"] == ["normal", "bacterial", "viral"]
        assert info.metadata["preprocessing"]["mean"] == 0.5
        loaded = mlflow.pytorch.load_model("models:/cxr-best/1")
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    assert torch.allclose(loaded(x), model(x))


def test_server_killed_mid_search(server, caplog):
    """Runs last in this module: it kills the server."""
    uri, proc = server
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = Tracker(uri, "cxr-outage")
    parent = tracker.start_parent("outage", {"a": 1}, {}, [], None)
    cb = tracker.callback(max_epochs=4)
    t = trial("o_00000", optimizer={"lr": 0.1})
    run_epochs(cb, t, [0.5])
    assert tracker.enabled and tracker.skipped == 0

    kill_group(proc)
    start = time.monotonic()
    for epoch in (2, 3):
        cb.on_trial_result(iteration=epoch, trials=[t], trial=t, result=result(epoch, 0.6))
    other = trial("o_00001", optimizer={"lr": 0.2})
    run_epochs(cb, other, [0.1, 0.2])
    cb.on_trial_complete(iteration=5, trials=[t], trial=t)
    cb.on_trial_error(iteration=6, trials=[other], trial=other)
    assert tracker.log_best(parent, "o_00000", {"a": 1}, {"val/f1_macro": 0.6}, {}, np.eye(2),
                            ["a", "b"], None, None, {}) is None
    tracker.end_parent(parent, status="FINISHED")
    assert time.monotonic() - start < 20  # fails fast: no retries with backoff
    assert not tracker.enabled and tracker.skipped >= 8
    stopped = [r for r in caplog.records if "stopped working" in r.getMessage()]
    assert len(stopped) == 1 and stopped[0].levelno == logging.WARNING
    tracker.close()
    assert f"{tracker.skipped} MLflow calls were not logged" in caplog.text
