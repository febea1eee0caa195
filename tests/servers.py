"""Real services for the tests: an `mlflow server` process and free ports; the set-up the
search tests share (a tiny demo space, an isolated working folder)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


class MlflowServer:
    """A real `mlflow server` on a fixed port with a sqlite store under ``root``, that can
    be stopped (SIGKILL, like a crash) and started again on the same port and store."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 90) -> "MlflowServer":
        self._log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{self.root}/mlflow.db", "--default-artifact-root", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + timeout_s
        while not _healthy(self.uri):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        return self

    def stop(self) -> None:
        """SIGKILL the server and everything it started; the port is free again."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def mlflow_server(root: Path):
    """`mlflow server` on a free port with a sqlite store under ``root``; yields (uri, process)."""
    server = MlflowServer(root)
    try:
        server.start()
        yield server.uri, server.proc
    finally:
        server.stop()


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# A tiny version of the demo space: 32 px, a few batches per epoch.
# report.explain=false: the report tests (conftest's shared search) turn explanations back on
TINY = ["data.image_size=32", "data.synthetic_n=120", "fixed.loop.batch_size=16",
        "fixed.loop.max_train_batches=4", "fixed.loop.max_eval_batches=2", "report.explain=false"]


def cxrtune(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`cxrtune ARGS` in a subprocess, as a user runs it in ``cwd`` (its own data home)."""
    env = {**os.environ, "CXRTUNE_HOME": str(cwd / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cxrtune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def isolate(tmp_path: Path, monkeypatch) -> None:
    """A search test's own working folder, data home and no MLflow telemetry."""
    monkeypatch.setenv("CXRTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)


@contextlib.contextmanager
def local_cluster(n_workers: int = 2, cpus_per_worker: float = 1, fast_health_checks: bool = False):
    """A REAL multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head
    node with no CPUs, which runs only drivers (like a real cluster's head), and
    ``n_workers`` worker nodes of ``cpus_per_worker`` CPUs each. They share the disk, so a
    tmp folder is a storage.path every node sees. With ``fast_health_checks`` the GCS
    checks node health every second, so a killed node is declared dead in about 3 s (Ray's
    defaults take 15-30 s). Yields the cluster, with ``head_id`` (the head's node id) and
    ``worker_ids`` (the worker nodes' ids) set; it is shut down on exit. The caller does not
    join it: pass ``cluster.address`` to the driver (``ray.init``, ``--address``)."""
    from ray.cluster_utils import Cluster

    head_args: dict = {"num_cpus": 0, "include_dashboard": False}
    if fast_health_checks:
        head_args["_system_config"] = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                                       "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        workers = [cluster.add_node(num_cpus=cpus_per_worker) for _ in range(n_workers)]
        cluster.wait_for_nodes()
        cluster.head_id = cluster.head_node.node_id
        cluster.worker_ids = {w.node_id for w in workers}
        yield cluster
    finally:
        cluster.shutdown()


def parent_and_children(client, experiment: str) -> tuple[list, list]:
    """An MLflow experiment's runs split into parent runs and nested (trial) runs."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])
