"""The distributed search, with real parts: a two-node Ray cluster on this machine, a real
`mlflow server` process, the driver killed with SIGKILL and resumed, an unreachable
tracking server, and every bundled space in --debug mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cxrtune.cli import app
from cxrtune.space import bundled_spaces, load_spec
from servers import TINY, free_port, isolate, kill_group, local_cluster, mlflow_server, parent_and_children

runner = CliRunner()

@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


@pytest.fixture
def ray_cluster():
    """A head node that only runs the driver (no CPUs for trials, like a real cluster's
    head) and two one-CPU worker nodes, all on this machine; this process joins it."""
    import ray

    with local_cluster(n_workers=2, cpus_per_worker=1) as cluster:
        ray.init(address=cluster.address)
        try:
            yield cluster
        finally:
            ray.shutdown()


GRID_SPACE = """
name: grid
data: {source: synthetic, image_size: 32, synthetic_n: 120}
fixed:
  model: {backbone: convnet5}
  optimizer: {name: sgd, momentum: 0.0}
  loop: {epochs: 3, batch_size: 16, max_train_batches: 4, max_eval_batches: 2}
space:
  optimizer.lr: {choice: [0.001, 0.003, 0.01, 1.0e+30]}
search:
  algorithm: grid
  scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
  max_concurrent: 2
"""


def tiny_spec(tmp_path: Path, *extra: str):
    return load_spec("demo", [*TINY, f"storage.path={tmp_path / 'ray'}", *extra])


def test_search_on_two_nodes_tracks_every_trial_in_a_real_mlflow_server(tmp_path, ray_cluster):
    from cxrtune.search import run_search

    # A grid so the outcome is known: one learning rate diverges to NaN, ASHA stops others.
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID_SPACE)
    with mlflow_server(tmp_path / "mlflow") as (uri, _):
        spec = load_spec(grid, [f"storage.path={tmp_path / 'ray'}", f"tracking.uri={uri}"])
        summary = run_search(spec, address=ray_cluster.address)
        client = MlflowClient(uri)
        parents, kids = parent_and_children(client, "cxrtune-grid")

        assert summary["n_trials"] == 4 and summary["n_failed"] == 1
        assert "test/f1_macro" in summary["test_metrics"] and summary["best_config"]["optimizer.lr"] < 1
        assert summary["mlflow_skipped_calls"] == 0
        # Trials ran on the worker nodes, reading the cached images through the object
        # store: the driver's node has no CPUs for them.
        from ray.tune import ExperimentAnalysis

        frames = ExperimentAnalysis(summary["experiment_dir"]).trial_dataframes.values()
        nodes = {n for df in frames if "node_id" in df for n in df["node_id"]}
        assert nodes and nodes <= ray_cluster.worker_ids and ray_cluster.head_id not in nodes
        # Disk does not grow with epochs: each trial keeps its best checkpoint and its latest.
        kept = {d.name: len(list(d.glob("checkpoint_*"))) for d in Path(summary["experiment_dir"]).glob("run_trial_*")}
        assert len(kept) == 4 and max(kept.values()) <= 2 and Path(summary["best_checkpoint"]).exists(), kept
        # ... and the summary says what they take
        assert summary["n_checkpoints"] == sum(kept.values())
        assert 0 < summary["disk_bytes"]["checkpoints"] <= summary["disk_bytes"]["results"]
        # One parent run, one child per trial, nested under it.
        (parent,) = parents
        assert len(kids) == 4 and {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
        assert len({k.data.tags["cxrtune.trial_id"] for k in kids}) == 4
        status = {k.data.params["optimizer.lr"]: k.data.tags["cxrtune.status"] for k in kids}
        assert status["1e+30"] == "failed" and set(status.values()) <= {"completed", "stopped_early", "failed"}
        failed = next(k for k in kids if k.data.tags["cxrtune.status"] == "failed")
        assert "diverged" in failed.data.tags["cxrtune.error"] and failed.info.status == "FAILED"
        done = next(k for k in kids if k.data.tags["cxrtune.status"] == "completed")
        history = client.get_metric_history(done.info.run_id, "val/f1_macro")
        assert [m.step for m in history] == [1, 2, 3]
        # The parent holds the test evaluation, the best checkpoint and the registered model.
        assert "test/accuracy" in parent.data.metrics and parent.data.params["data_fingerprint"]
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"confusion_matrix.json", "best_checkpoint"} <= artifacts
        assert client.search_model_versions("name='cxrtune-best'")


def _trial_states(exp: Path) -> dict[str, str]:
    """trial id -> status, from Tune's experiment state snapshot."""
    snapshots = sorted(exp.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:  # the newest one: each driver session writes its own
        data = json.loads(snapshots[-1].read_text()) if snapshots else {}
    except (OSError, ValueError):
        return {}  # being rewritten
    states = {}
    for entry in data.get("trial_data", []):
        meta = json.loads(entry[0]) if isinstance(entry, list) else entry
        states[meta.get("trial_id")] = meta.get("status")
    return states


EPOCHS = 4  # of each trial of the killed search


def _result_lines(exp: Path) -> dict[str, int]:
    return {d.name: len((d / "result.json").read_text().splitlines())
            for d in exp.iterdir() if (d / "result.json").exists()}


def _checkpointed_unfinished(exp: Path, states: dict[str, str]) -> list[str]:
    """Trials Tune's snapshot has not finished that have checkpointed an epoch (their
    folder, named after the trial id, holds a checkpoint_*)."""
    return [t for t, s in states.items() if s != "TERMINATED"
            and any(any(d.glob("checkpoint_*")) for d in exp.glob(f"run_trial_{t}_*"))]


def _mid_search(exp: Path) -> bool:
    """Tune's snapshot holds a finished trial, and another trial is mid-way."""
    states = _trial_states(exp)
    return "TERMINATED" in states.values() and bool(_checkpointed_unfinished(exp, states))


@pytest.fixture
def cluster():
    """A 0-CPU head and two 1-CPU worker nodes (``servers.local_cluster``) that outlive
    the drivers run against it; this process owns the cluster but does not join it."""
    with local_cluster(n_workers=2, cpus_per_worker=1) as c:
        yield c


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _wait_released(cluster, driver_pid: int, timeout_s: float = 60) -> dict:
    """Wait until the cluster has let go of a killed driver's search: its job is dead,
    Ray has killed its actors (the trials) and their worker processes, and every worker
    CPU is free again. Read from the GCS through the cluster's own state accessor (no
    ``ray.init`` here). Returns what was seen."""
    state = cluster.global_state
    deadline, t0 = time.monotonic() + timeout_s, time.monotonic()
    while True:
        jobs = {j["JobID"]: j for j in state.job_table() if j["DriverPid"] == driver_pid}
        actors = [a for a in state.actor_table(None).values() if a["JobID"] in jobs]
        live = [a for a in actors if a["State"] != "DEAD" or _alive(a["Pid"])]
        total, free = state.cluster_resources().get("CPU", 0), state.available_resources().get("CPU", 0)
        if jobs and all(j["IsDead"] for j in jobs.values()) and actors and not live and free == total:
            return {"after_s": round(time.monotonic() - t0, 1), "actors": len(actors), "free_cpus": free}
        assert time.monotonic() < deadline, (
            f"the cluster still holds the killed driver's search after {timeout_s} s: jobs {list(jobs.values())}, "
            f"live actors {[(a['ActorClassName'], a['State'], a['Pid']) for a in live]}, CPU {free}/{total} free")
        time.sleep(0.2)


def test_driver_killed_mid_search_resumes_without_rerunning_or_duplicating(tmp_path, cluster):
    # Both drivers join the same persistent multi-node cluster (--address), as on a real
    # cluster whose head outlives a driver killed mid-search.
    args = ["search", "demo", "--address", cluster.address, *sum((["--set", s] for s in TINY), []),
            "--set", "search.num_samples=4", "--set", f"fixed.loop.epochs={EPOCHS}",
            "--set", "search.scheduler.name=fifo",
            "--set", f"storage.path={tmp_path / 'ray'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    exe = [sys.executable, "-m", "cxrtune.cli"]
    # Tune snapshots the search (trial states, results) to storage every 10 s by default;
    # the whole tiny search takes less on two nodes: every second, the kill lands mid-search.
    env = {**os.environ, "RAY_ADDRESS": "", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    exp = tmp_path / "ray" / "demo"
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen([*exe, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        deadline = time.monotonic() + 240
        while not _mid_search(exp):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.05)
        # ... but not while Tune is still copying that snapshot to storage: a kill then
        # leaves a mix of two snapshots (seen: an extra trial created on resume).
        time.sleep(0.3)
        kill_group(driver)  # SIGKILL: no cleanup of any kind
    # The cluster lives on. Ray notices the driver is gone, ends its job and kills its
    # actors (the trials it was running, at most one epoch further); only then resume.
    released = _wait_released(cluster, driver.pid)
    states = _trial_states(exp)
    finished_before = {t for t, s in states.items() if s == "TERMINATED"}
    lines_before = _result_lines(exp)
    assert finished_before and _checkpointed_unfinished(exp, states), states  # killed mid-search, mid-trial
    at_kill = {d.name[:18]: (states.get(d.name.split("_")[2]), lines_before.get(d.name, 0),
                             len(list(d.glob("checkpoint_*")))) for d in exp.glob("run_trial_*")}
    print(f"killed with (status, results, checkpoints) {at_kill}; released by the cluster: {released}")

    resumed = subprocess.run([*exe, *args, "--resume", "--json"], capture_output=True, text=True, env=env,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)  # --json: stdout holds the result only
    assert summary["n_trials"] == 4 and summary["n_failed"] == 0
    lines_after = _result_lines(exp)
    for trial_dir, n in lines_before.items():
        if any(t in trial_dir for t in finished_before):
            assert lines_after[trial_dir] == n  # finished trials were not re-run
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    parents, kids = parent_and_children(client, "cxrtune-demo")
    assert len(parents) == 1 and len(kids) == 4
    assert len({k.data.tags["cxrtune.trial_id"] for k in kids}) == 4  # no duplicate child runs
    # A trial running at the kill went on from its last checkpoint: no epoch was trained twice
    # (or lost: every trial of the search has all its epochs, each once). A trial created
    # after Tune's last snapshot leaves a folder of its own that is no trial's any more (the
    # resumed search runs that point again as a new trial).
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(exp)).trials
    assert len(trials) == 4
    nodes = set()
    for trial in trials:
        results = [json.loads(line) for line in (Path(trial.path) / "result.json").read_text().splitlines()]
        epochs = [r["epoch"] for r in results]
        assert epochs == list(range(1, EPOCHS + 1)), (Path(trial.path).name, epochs)
        nodes |= {r["node_id"] for r in results}
    # Trials ran on the worker nodes (two at once: both of them), never on the 0-CPU head.
    assert len(nodes) >= 2 and nodes <= cluster.worker_ids and cluster.head_id not in nodes, nodes

    # Resuming a finished search changes nothing: same summary, the model is not registered again.
    again = subprocess.run([*exe, *args, "--resume", "--json"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    repeat = json.loads(again.stdout)
    for key in ("best_trial", "best_val", "mlflow_parent_run", "best_checkpoint", "counts"):
        assert repeat[key] == summary[key], key
    assert len(client.search_model_versions("name='cxrtune-best'")) == 1
    assert len(parent_and_children(client, "cxrtune-demo")[1]) == 4
    # ... and a changed space under the same name is refused, naming what differs.
    changed = subprocess.run([*exe, *args, "--set", "search.seed=7", "--resume"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert changed.returncode == 2 and "search.seed: 0 -> 7" in changed.stderr, changed.stderr[-2000:]


def test_unreachable_tracking_server_does_not_stop_the_search(tmp_path, caplog):
    from cxrtune.search import run_search

    spec = tiny_spec(tmp_path, "search.num_samples=2", "fixed.loop.epochs=2",
                     f"tracking.uri=http://127.0.0.1:{free_port()}")
    summary = run_search(spec)
    assert summary["n_trials"] == 2 and summary["test_metrics"]
    assert any("MLflow" in r.message for r in caplog.records if r.levelname == "WARNING")
    import ray

    ray.shutdown()


def test_bad_space_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nspace:\n  optimizer.lr: {loguniform: [0, 0.1]}\n"
                   "  preprocess.median_kernel: {choice: [3, 4]}\n")
    r = runner.invoke(app, ["search", str(bad)])
    assert r.exit_code == 2
    assert "bad.yaml" in r.output and "optimizer.lr" in r.output and "median_kernel = 4" in r.output
    assert not (tmp_path / "cxrtune_runs").exists()


@pytest.mark.parametrize("space", bundled_spaces())
def test_every_bundled_space_runs_in_debug_mode(tmp_path, space):
    # The real-data spaces run here on the synthetic data, without pretrained files.
    args = ["search", space, "--debug", "--json", "--set", "data.source=synthetic", "--set", "data.root=null",
            "--set", "data.synthetic_n=120", "--set", "data.image_size=80", "--set", "fixed.loop.device=cpu"]
    if load_spec(space).fixed.get("model", {}).get("weights", "none") != "none":
        args += ["--set", "fixed.model.weights=none"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["epochs"] >= 1 and summary["point"]


def test_a_new_search_never_overwrites_an_earlier_one_and_resume_takes_the_latest(tmp_path):
    from cxrtune.errors import ConfigError
    from cxrtune.search import with_run_name

    spec = tiny_spec(tmp_path)
    with pytest.raises(ConfigError, match="no search 'demo' to resume"):
        with_run_name(spec, resume=True)
    assert with_run_name(spec, resume=False).name == "demo"
    for name in ("demo", "demo-2"):  # what Tune leaves behind for a search it can restore
        (tmp_path / "ray" / name).mkdir(parents=True)
        (tmp_path / "ray" / name / "tuner.pkl").write_bytes(b"")
    assert with_run_name(spec, resume=False).name == "demo-3"
    assert with_run_name(spec, resume=True).name == "demo-2"
