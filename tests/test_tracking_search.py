"""A real (tiny) search on a REAL multi-node Ray cluster on this machine (a 0-CPU head that
runs only the driver, two 1-CPU worker nodes running trials at once), logging to a REAL
`mlflow server` that dies mid-search and comes back on the same port and store: every
trial ends up logged once, in one parent run."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from cxrtune.space import load_spec
from servers import TINY, MlflowServer, isolate, local_cluster, parent_and_children


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)
    monkeypatch.setenv("CXRTUNE_MLFLOW_WAIT_S", "120")  # the end waits for the restarted server


@pytest.fixture
def cluster():
    """A 0-CPU head (the driver: this test process joins it in run_search) and two 1-CPU
    worker nodes, so two trials run at once, one per node."""
    with local_cluster(n_workers=2, cpus_per_worker=1) as c:
        yield c


def _kill_then_restart(server: MlflowServer, experiment: str, done: list) -> None:
    """Stop the server once the first trial has logged an epoch, then start it again."""
    client = MlflowClient(server.uri)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id], "tags.`cxrtune.role` = 'trial'") if exp else []
            if any(r.data.metrics for r in runs):
                break
        except Exception:  # noqa: BLE001 - not there yet
            pass
        time.sleep(0.2)
    server.stop()
    done.append("stopped")
    time.sleep(2)  # a few more trial events while it is down
    server.start()
    done.append("started")


def test_search_survives_an_mlflow_restart_and_logs_every_trial_once(tmp_path, caplog, cluster):
    import logging

    import ray
    from ray.tune import ExperimentAnalysis

    from cxrtune.search import run_search

    caplog.set_level(logging.INFO, logger="cxrtune.tracking")
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        spec = load_spec("demo", [*TINY, f"storage.path={tmp_path / 'ray'}", f"tracking.uri={server.uri}",
                                  "search.num_samples=2", "search.max_concurrent=2", "fixed.loop.epochs=3",
                                  "search.scheduler.name=fifo", "tracking.register_model=null"])
        events: list = []
        chaos = threading.Thread(target=_kill_then_restart, args=(server, "cxrtune-demo", events), daemon=True)
        chaos.start()
        summary = run_search(spec, address=cluster.address)
        chaos.join(timeout=120)
        assert events == ["stopped", "started"]
        messages = [r.getMessage() for r in caplog.records]
        assert any("is not answering" in m for m in messages)  # the outage happened mid-search
        assert any("answers again" in m for m in messages)
        assert summary["n_trials"] == 2 and summary["mlflow_skipped_calls"] == 0

        # The trials ran at once on the two worker nodes (one 1-CPU node each), never on the
        # head. Their results carry the Ray node id (Tune's own node_ip is 127.0.0.1 for
        # every node on one machine).
        analysis = ExperimentAnalysis(summary["experiment_dir"])
        nodes = {n for df in analysis.trial_dataframes.values() for n in df["node_id"]}
        assert len(nodes) >= 2 and nodes <= cluster.worker_ids and cluster.head_id not in nodes, nodes

        client = MlflowClient(server.uri)
        (parent,), kids = parent_and_children(client, "cxrtune-demo")
        assert parent.info.status == "FINISHED" and parent.info.run_id == summary["mlflow_parent_run"]
        assert "test/accuracy" in parent.data.metrics
        assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
        assert sorted(k.data.tags["cxrtune.trial_id"] for k in kids) == sorted(
            t.trial_id for t in analysis.trials)
        for k in kids:  # every epoch Tune saw, logged once
            epochs = [m.step for m in client.get_metric_history(k.info.run_id, "val/f1_macro")]
            assert sorted(epochs) == [1, 2, 3], k.data.tags["cxrtune.trial_id"]
            assert k.info.status == "FINISHED" and k.data.tags["cxrtune.status"] == "completed"
        # the model is the search's, and the Default experiment (made by the store) is empty
        (model,) = client.search_logged_models([parent.info.experiment_id])
        assert model.source_run_id == parent.info.run_id
        assert client.search_logged_models(["0"]) == [] and client.search_runs(["0"]) == []
    finally:
        ray.shutdown()
        server.stop()
