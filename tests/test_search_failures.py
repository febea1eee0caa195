"""Searches that cannot run fail in seconds with a clear message and leave no MLflow run
RUNNING; a search whose every trial fails names the real cause; without --address a
search never joins a Ray cluster someone else started on the machine. Real local Ray,
real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from servers import TINY as TINY_DEMO, free_port, isolate

TINY = [*TINY_DEMO, "search.num_samples=2", "fixed.loop.epochs=2"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _command(tmp_path: Path, space: str, sets, args) -> list[str]:
    return [sys.executable, "-m", "cxrtune.cli", "search", space, "--json", *args,
            *sum((["--set", s] for s in [*TINY, f"storage.path={tmp_path / 'ray'}",
                                          f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *sets]), [])]


def search(tmp_path: Path, space: str, *sets: str, args: tuple[str, ...] = (), timeout: float = 300):
    start = time.monotonic()
    proc = subprocess.run(_command(tmp_path, space, sets, args), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def search_started(tmp_path: Path, space: str, *sets: str, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """A search running in the background, returned once its first trial has started."""
    proc = subprocess.Popen(_command(tmp_path, space, sets, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "ray").glob(f"{space}/*/result.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    return proc


def error_line(stderr: str) -> str:
    """cxrtune's own one-line error: the last line that starts with ``error:``. Ray forwards
    its nodes' log lines (a raylet's disk-space warning, say) to the driver's stderr when
    they arrive, so the error is not always the very last line."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines, stderr[-3000:]
    return lines[-1]


def runs(tmp_path: Path) -> list:
    if not (tmp_path / "m.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)


@pytest.mark.parametrize("case, sets, args, words", [
    ("a GPU on a machine without one", ["resources.gpu=1"], (), ["needs 1 CPU + 1 GPU", "resources.gpu: 0"]),
    ("unreachable --address", [], ("--address", f"127.0.0.1:{free_port()}"), ["no Ray cluster answers",
                                                                           "--address"]),
    ("unwritable storage", ["storage.path=/proc/cxrtune"], (), ["storage.path='/proc/cxrtune'", "cannot write"]),
])
def test_a_search_that_can_never_run_fails_in_seconds_with_no_run_left_running(tmp_path, case, sets, args, words):
    proc, took = search(tmp_path, "demo", *sets, args=args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_line(proc.stderr)
    assert message.startswith("error:") and all(w in message for w in words), message
    assert "Traceback" not in proc.stderr
    assert took < 60, f"{case}: took {took:.0f} s"
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]


def test_when_every_trial_fails_the_message_names_the_first_trials_own_error(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: bad\ndata: {source: synthetic}\nfixed: {model: {backbone: convnet5}, "
                    "optimizer: {name: sgd, momentum: 0.0}}\n"
                    "space:\n  optimizer.lr: {choice: [1.0e+30, 1.0e+31]}\nsearch: {algorithm: grid}\n")
    proc, _ = search(tmp_path, str(grid))
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = error_line(proc.stderr)
    assert "all 2 trials of 'bad' failed" in message and "TrainingDiverged: loss became nan" in message, message
    assert "RayTaskError" not in message
    (parent,) = [r for r in runs(tmp_path) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"
    # Divergence is not retried: each trial trained one epoch once, its retries failed at once.
    for trial in (tmp_path / "ray" / "bad").glob("run_trial_*"):
        lines = (trial / "result.json").read_text().splitlines() if (trial / "result.json").exists() else []
        assert len(lines) == 0, trial


def test_without_an_address_a_search_starts_its_own_ray_and_never_joins_another(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert other.returncode == 0, other.stderr[-2000:]
    try:
        probe = ("import logging, ray; from cxrtune.search import init_ray; init_ray(None); "
                 "print(ray.get_runtime_context().gcs_address)")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert not out.stdout.strip().endswith(f":{port}"), out.stdout
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=60)


def test_ctrl_c_ends_the_parent_run_killed_and_says_how_to_resume(tmp_path):
    import signal

    cmd = [sys.executable, "-m", "cxrtune.cli", "search", "demo",
           *sum((["--set", s] for s in [*TINY, "search.num_samples=4", "fixed.loop.epochs=6",
                                         "search.scheduler.name=fifo", f"storage.path={tmp_path / 'ray'}",
                                         f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]), [])]
    with open(tmp_path / "out.log", "wb") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not list((tmp_path / "ray" / "demo").glob("run_trial_*/result.json")):
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert driver.wait(timeout=180) == 1, (tmp_path / "out.log").read_text()[-3000:]
    log = (tmp_path / "out.log").read_text()
    assert "was interrupted" in log and "--resume" in log
    # noise a user cannot act on stays out of the output (--verbose brings it back)
    for noise in ("Checkpoint successfully created", "Result logdir", "A new study created",
                  "Creating initial MLflow database tables", "Token authentication is enabled",
                  "Experiment state snapshotting"):
        assert noise not in log, noise
    (parent,) = [r for r in runs(tmp_path) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"


def test_a_storage_folder_a_worker_node_cannot_see_is_refused_before_any_trial(tmp_path, monkeypatch):
    """The worker node runs in its own mount namespace with an empty tmpfs over the
    storage folder: like a worker machine where that path is a local disk, not a share.
    Joining mid-search, its trial fails with the reason (its checkpoints would be lost);
    present at the start, the search is refused before any trial."""
    storage = tmp_path / "ray"
    storage.mkdir()
    port = free_port()
    # a throw-away cluster on loopback: the head, the namespaced worker and the driver
    # would otherwise each need the head's auth token handed over
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = ["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"]
    address = ("--address", f"127.0.0.1:{port}")
    try:
        head = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=0",
                               "--include-dashboard=false"], capture_output=True, text=True, timeout=120, env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        sharing = subprocess.run(start, capture_output=True, text=True, timeout=120, env=env)
        assert sharing.returncode == 0, sharing.stderr[-2000:]
        # The first trial keeps the sharing worker busy (some 40 s); the second waits for a
        # CPU, gets the blind worker's when it joins and fails there on every attempt (each
        # is a new trial process: ~6 s to start here) before the first trial ends.
        late = search_started(tmp_path, "demo", "fixed.loop.epochs=150", "search.scheduler.name=fifo",
                              "search.max_concurrent=2", args=address)
        blind = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {storage} && "
                                + " ".join(start)], capture_output=True, text=True, timeout=120, env=env)
        if blind.returncode != 0 and "unshare" in blind.stderr:
            pytest.skip(f"no mount namespaces here: {blind.stderr.strip()[-200:]}")
        assert blind.returncode == 0, blind.stderr[-2000:]
        out, err = late.communicate(timeout=300)
        assert late.returncode == 0, err[-3000:]
        trials = {t["status"]: t for t in json.loads(out)["trials"]}
        assert set(trials) == {"completed", "failed"}, trials
        error = trials["failed"]["error"]
        assert "StorageNotShared" in error and "cannot see" in error and "s3://" in error, error

        proc, took = search(tmp_path, "demo", args=address, timeout=180)
        assert proc.returncode == 2, proc.stderr[-3000:]
        message = error_line(proc.stderr)
        assert "is not shared" in message and str(storage) in message and "s3://" in message, message
        assert len(list(storage.glob("demo*"))) == 1, "the second search may not start any trial"
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=60)


def test_a_resume_tune_cannot_restore_stops_before_changing_anything(tmp_path):
    """Tune logs a state it cannot read and starts the search afresh, which would hide the
    finished trials and have their MLflow runs deleted as orphans: cxrtune stops instead."""
    first, _ = search(tmp_path, "demo")
    assert first.returncode == 0, first.stderr[-3000:]
    experiment = tmp_path / "ray" / "demo"
    state = experiment / "cxrtune_search.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "summary"}))
    (tune_state,) = experiment.glob("experiment_state-*.json")
    tune_state.write_text("{ not json")  # e.g. a disk that filled up mid-write
    before = sorted(p.name for p in experiment.iterdir())
    kids = [r.info.run_id for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]

    resumed, _ = search(tmp_path, "demo", args=("--resume",))
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    message = error_line(resumed.stderr)
    assert "cannot resume the search" in message and "JSONDecodeError" in message and "--resume" in message, message
    assert sorted(p.name for p in experiment.iterdir()) == before  # no new trial, no new state
    assert sorted(r.info.run_id for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags) == sorted(kids)
