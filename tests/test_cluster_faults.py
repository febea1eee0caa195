"""Fault tolerance on a REAL multi-node Ray cluster on this machine (a 0-CPU head that
only runs the driver, three 1-CPU worker nodes, a storage folder every node sees) with a
real `mlflow server`: a worker node is killed (SIGKILL, no graceful shutdown) while its
trial is mid-way, a fresh node joins, and the search still ends with every trial whole
and tracked exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from servers import TINY, MlflowServer, isolate, kill_group, local_cluster, parent_and_children

EPOCHS = 6
# An epoch takes about half a second here (TINY). The node is
# killed as soon as a trial's result file shows an epoch with two or more still to go,
# so the kill lands early in the next epoch, mid-trial (TINY: 32 px, 4 batches per epoch).


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


@pytest.fixture
def cluster():
    """A head node with no CPUs (it runs the driver only) and three 1-CPU worker nodes,
    all on this machine (so they share the disk: storage.path is a shared folder); a
    killed node is declared dead in about 3 s."""
    with local_cluster(n_workers=3, cpus_per_worker=1, fast_health_checks=True) as c:
        yield c


def _results(trial_dir: Path) -> list[dict]:
    """A trial's results (one per epoch) as Tune wrote them; a line being written is skipped."""
    out = []
    try:
        lines = (trial_dir / "result.json").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _kill_node(cluster, node, trial_pid: int) -> None:
    """Kill a worker node as when its machine dies: its raylet and object store (SIGKILL,
    no graceful shutdown), then its worker processes, the trial's among them (on one
    machine they would otherwise outlive their raylet for seconds and keep reporting)."""
    cluster.remove_node(node, allow_graceful=False)
    pids = {trial_pid}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if node.raylet_socket_name.encode() in cmdline.read_bytes():
                pids.add(int(cmdline.parent.name))
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _busy_trial(cluster, exp: Path):
    """(trial folder, its last result, its node) for a trial that has reported an epoch
    and has at least two to go; None while there is none."""
    for trial_dir in sorted(exp.glob("run_trial_*")):
        results = _results(trial_dir)
        if results and 1 <= results[-1]["epoch"] <= EPOCHS - 2:
            node = next((n for n in cluster.worker_nodes if n.node_id == results[-1]["node_id"]), None)
            if node is not None:
                return trial_dir, results[-1], node
    return None


def test_a_worker_node_killed_mid_search_loses_no_trial_and_no_epoch(tmp_path, cluster):
    from ray.tune import ExperimentAnalysis

    head = cluster.head_node.node_id
    workers = {n.node_id for n in cluster.worker_nodes}
    server = MlflowServer(tmp_path / "mlflow").start()
    exp = tmp_path / "ray" / "demo"
    sets = [*TINY, f"storage.path={tmp_path / 'ray'}", f"tracking.uri={server.uri}", "search.num_samples=4",
            "search.max_concurrent=3", f"fixed.loop.epochs={EPOCHS}", "search.scheduler.name=fifo",
            "tracking.register_model=null"]
    # The driver is a process of its own that joins the cluster (--address), as on a real
    # cluster; this test plays the operator whose node dies.
    cmd = [sys.executable, "-m", "cxrtune.cli", "search", "demo", "--json", "--address", cluster.address,
           *sum((["--set", s] for s in sets), [])]
    log_path = tmp_path / "driver.log"
    t0 = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                                      env={**os.environ, "RAY_ADDRESS": ""})
            # Once a trial has reported an epoch (and has two to go), kill its worker node
            # (SIGKILL, no graceful shutdown), then add a fresh node: the cluster keeps capacity.
            events: dict = {}
            while (busy := _busy_trial(cluster, exp)) is None:
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() - t0 < 240, "no trial reported an epoch in time"
                time.sleep(0.05)
            trial_dir, last, victim = busy
            _kill_node(cluster, victim, last["pid"])
            events.update(killed=victim.node_id, trial=trial_dir.name, epoch=last["epoch"],
                          at=round(time.monotonic() - t0, 1))
            events["fresh"] = cluster.add_node(num_cpus=1).node_id
            out, _ = driver.communicate(timeout=300)
        print(f"search took {time.monotonic() - t0:.1f} s; {events}")
        assert driver.returncode == 0, log_path.read_text()[-5000:]
        summary = json.loads(out)  # stdout holds the result only: no Ray or MLflow notices

        # The search still finished every trial.
        assert summary["n_trials"] == 4 and summary["n_failed"] == 0
        assert summary["counts"]["completed"] == 4, summary["counts"]
        trials = ExperimentAnalysis(str(exp)).trials
        assert sorted(t.status for t in trials) == ["TERMINATED"] * 4
        # Tune restarted the trial on the killed node (once), and only that one
        assert {Path(t.path).name: t.num_failures for t in trials if t.num_failures} == {events["trial"]: 1}

        # Every trial's epochs ran once each: a restarted trial went on from its last
        # checkpoint (no epoch trained twice, none back at 1), and no result was lost.
        nodes = set()
        for trial_dir in sorted(exp.glob("run_trial_*")):
            results = _results(trial_dir)
            epochs = [r["epoch"] for r in results]
            assert epochs == list(range(1, EPOCHS + 1)), (trial_dir.name, epochs)
            nodes |= {r["node_id"] for r in results}
            if trial_dir.name == events["trial"]:
                before = [r["node_id"] for r in results if r["epoch"] <= events["epoch"]]
                after = [r["node_id"] for r in results if r["epoch"] > events["epoch"]]
                assert set(before) == {events["killed"]}
                # it went on on a node that was alive after the kill
                assert after and events["killed"] not in after
                assert set(after) <= (workers - {events["killed"]}) | {events["fresh"]}
        # Trials were spread over the worker nodes, never on the head.
        assert head not in nodes and nodes <= workers | {events["fresh"]}
        assert len(nodes & workers) >= 2, nodes

        # MLflow: one parent, exactly one ended child run per trial (no duplicate for the
        # restarted trial, no orphan), each epoch logged once.
        client = MlflowClient(server.uri)
        (parent,), kids = parent_and_children(client, "cxrtune-demo")
        assert parent.info.status == "FINISHED" and parent.info.run_id == summary["mlflow_parent_run"]
        assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
        assert sorted(k.data.tags["cxrtune.trial_id"] for k in kids) == sorted(t.trial_id for t in trials)
        for k in kids:
            assert k.info.status == "FINISHED" and k.data.tags["cxrtune.status"] == "completed"
            steps = [m.step for m in client.get_metric_history(k.info.run_id, "val/f1_macro")]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (k.data.tags["cxrtune.trial_id"], steps)
    finally:
        if "driver" in locals():
            kill_group(driver)
        server.stop()
