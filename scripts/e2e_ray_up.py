"""End to end, for real: the README's cluster run-book with the on-premises config
(cluster-local.yaml) against THIS machine as the head node (which also runs the trials),
reached over SSH on loopback: `ray up`, `ray status`, `cxrtune search demo` in tmux on
the head, the Ray dashboard through `ray dashboard`'s SSH forward, the driver killed
mid-search (tmux gone, as when the head restarts) and the search finished with
`--resume`; the MLflow server the head started then holds one parent run, one run per
trial and the registered model; `ray down`.

    sudo python scripts/e2e_ray_up.py [--keep]     (from the checkout's root; about 4 minutes when
                                                    pip installs from local mirrors)

It needs root (it installs openssh-server, rsync and tmux when missing, adds a user
`cxrtune-e2e` whose home plays the cluster machine's, and runs its own sshd on
127.0.0.1:22 with its own host key). cluster-local.yaml is used as a user would, with only
what its header says to change: head_ip 127.0.0.1, no workers, that user and a fresh key,
and a folder here for /shared/cxrtune. One more change, because this machine is offline:
the ImageNet-weights download is left out (the demo space trains from scratch). The node's
pip uses the same package index settings as this machine's. Everything it started is
stopped at the end (the user and its home removed unless --keep); exit status 0 only if
every check passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from cxrtune.space import load_spec

log = logging.getLogger("e2e")
ROOT = Path(__file__).resolve().parents[1]
USER = "cxrtune-e2e"
WORK = Path("/tmp/cxrtune-e2e")
SHARED = WORK / "shared"
MLFLOW = "http://127.0.0.1:5000"
PORTS = {22: "sshd", 5000: "the head's MLflow server", 6379: "the Ray head", 8265: "the Ray dashboard",
         8266: "the dashboard's SSH forward"}


def sh(*cmd: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, check=check, timeout=timeout, text=True, **kw)


def ray_cli(*args: str, timeout: float, logfile: Path) -> str:
    """A `ray` CLI command run from the checkout's root (file_mounts copy `.`), its output
    kept in ``logfile`` and returned."""
    log.info("$ ray %s   (output: %s)", " ".join(args), logfile)
    with open(logfile, "w") as out:
        proc = subprocess.run(["ray", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, text=True)
    text = logfile.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"ray {args[0]} failed (exit {proc.returncode}); last lines of {logfile}:\n"
                         + "\n".join(text.splitlines()[-40:]))
    return text


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def preflight() -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root: the script adds a user and runs sshd on port 22")
    if subprocess.run(["pgrep", "-f", "gcs_server"], capture_output=True).stdout:
        raise SystemExit("a Ray cluster runs on this machine: stop it first (`ray stop`); the search's "
                         "--address auto would find it as well as the one this script starts")
    busy = [f"{p} ({what})" for p, what in PORTS.items() if port_busy(p)]
    if busy:
        raise SystemExit(f"127.0.0.1 ports in use: {', '.join(busy)}; stop what listens there first")
    # Ray's lock files live in one folder of /tmp for every user; made by root (this
    # script's own Ray use) it shuts the cluster's user out of restoring a search
    locks = Path("/tmp/_ray_lockfiles")
    locks.mkdir(exist_ok=True)
    locks.chmod(0o1777)
    missing = [pkg for pkg, exe in (("openssh-server", "/usr/sbin/sshd"), ("rsync", "rsync"),
                                                   ("tmux", "tmux"))
               if not shutil.which(exe)]
    if missing:
        sh("apt-get", "install", "-y", "-q", *missing, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def make_user() -> Path:
    """The cluster machine's account: its own home, the SSH key the config names, and the
    pip index settings of this machine (so `setup_commands` install from the same place)."""
    if not _user_exists():
        sh("useradd", "--create-home", "--shell", "/bin/bash", USER)
        sh("usermod", "--password", "*", USER)  # no password, but not locked: sshd lets key logins in
    home = Path(pwd.getpwnam(USER).pw_dir)
    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "id_ed25519"
    if not key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    pip_conf = Path.home() / ".config/pip/pip.conf"
    if pip_conf.exists():
        (home / ".config/pip").mkdir(parents=True, exist_ok=True)
        shutil.copy(pip_conf, home / ".config/pip/pip.conf")
    SHARED.mkdir(parents=True, exist_ok=True)
    for path in (home, SHARED):
        sh("chown", "-R", f"{USER}:{USER}", str(path))
    return key


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
        return True
    except KeyError:
        return False


def start_sshd() -> subprocess.Popen:
    """sshd on 127.0.0.1:22 only, key logins only, with its own host key and config."""
    host_key = WORK / "ssh_host_ed25519_key"
    if not host_key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    config = WORK / "sshd_config"
    config.write_text(f"ListenAddress 127.0.0.1\nPort 22\nHostKey {host_key}\nPidFile {WORK}/sshd.pid\n"
                      f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n"
                      f"AllowUsers {USER}\nUsePAM no\nMaxStartups 100\nMaxSessions 100\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(WORK / "sshd.log")])
    _wait(lambda: port_busy(22), 30, "sshd to listen on 127.0.0.1:22")
    return sshd


def write_config(key: Path) -> Path:
    """cluster-local.yaml with what its header says to change, and the weights download left out."""
    config = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    config["setup_commands"] = [c for c in config["setup_commands"] if "imagenet_weights_file" not in c]
    for section in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        config[section] = [c.replace("/shared/cxrtune", str(SHARED)) for c in config[section]]
    path = WORK / "cluster-e2e.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("cluster config: %s", path)
    return path


def search_command(*extra: str) -> str:
    """The run-book's $SEARCH (the summary as JSON in a file on the head, which here is this machine)."""
    return " ".join([f"cxrtune search demo --address auto --set storage.path={SHARED}/ray_results",
                     f"--set tracking.uri={MLFLOW}", *extra, "--json > ~/summary.json"])


def search_in_tmux_and_drop_it(config: Path) -> None:
    """Run-book steps 3 and 4: the search in tmux on the head, the dashboard through its
    SSH forward; then the driver dies as when the head restarts (tmux killed), once a
    trial has finished and before the search has."""
    ray_cli("exec", "--tmux", str(config), search_command(), timeout=120, logfile=WORK / "search_tmux.log")
    forward = subprocess.Popen(["ray", "dashboard", "--port", "8266", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _answers("http://127.0.0.1:8266/api/version"), 120, "the dashboard through its forward")
        log.info("ray dashboard: answers at http://127.0.0.1:8266 through the SSH forward")
    finally:
        forward.terminate()
    _wait(_a_trial_finished, 600, "a finished trial in the head's MLflow")
    summary = _home() / "summary.json"
    if summary.exists() and summary.stat().st_size:
        raise SystemExit("the search finished before the driver could be killed mid-search")
    ray_cli("exec", str(config), "tmux kill-server", timeout=120, logfile=WORK / "kill.log")
    _wait(lambda: not _driver_running(), 60, "the killed driver to exit")
    log.info("driver killed mid-search (tmux server killed on the head)")


def resume_search(config: Path) -> dict:
    """Run-book step 5: the same command with --resume, waited for."""
    out = ray_cli("exec", str(config), search_command("--resume"), timeout=1800, logfile=WORK / "search.log")
    if "joined the Ray cluster" not in out:
        raise SystemExit(f"the search did not say which cluster it joined; see {WORK / 'search.log'}")
    return json.loads((_home() / "summary.json").read_text())


def _home() -> Path:
    return Path(pwd.getpwnam(USER).pw_dir)


def _driver_running() -> bool:
    return bool(subprocess.run(["pgrep", "-u", USER, "-f", "cxrtune search"], capture_output=True).stdout)


def _a_trial_finished() -> bool:
    from mlflow import MlflowClient

    try:
        client = MlflowClient(MLFLOW)
        exp = client.get_experiment_by_name("cxrtune-demo")
        return exp is not None and bool(client.search_runs(
            [exp.experiment_id], "tags.`cxrtune.role` = 'trial' and attributes.status = 'FINISHED'"))
    except Exception:  # noqa: BLE001 - the server is busy or the experiment is not there yet
        return False


def check_mlflow(summary: dict) -> list[str]:
    """The head's MLflow server has the parent run, one child per trial, and the model."""
    from mlflow import MlflowClient

    client = MlflowClient(MLFLOW)
    exp = client.get_experiment_by_name("cxrtune-demo")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    trial_ids = {k.data.tags.get("cxrtune.trial_id") for k in kids}
    versions = client.search_model_versions("name='cxrtune-best'")
    artifacts = sorted(p.name for p in (SHARED / "mlflow").rglob("*") if p.is_file())
    found = {"parent runs": len(parents), "trial runs": len(kids), "trials in the summary": summary["n_trials"],
             "parent status": parents[0].info.status if parents else None,
             "model versions": len(versions), "artifact files on the shared folder": len(artifacts),
             "best": f"{summary['best_trial']} val={summary['best_val']:.4f}"}
    log.info("MLflow on the head: %s", found)
    problems = []
    planned = load_spec("demo").search.num_samples
    if summary["n_trials"] != planned or summary["n_failed"]:
        problems.append(f"the demo space plans {planned} trials; the search ended with {summary['n_trials']} "
                        f"({summary['n_failed']} failed)")
    if len(parents) != 1 or parents[0].info.run_id != summary["mlflow_parent_run"]:
        problems.append(f"expected the summary's parent run {summary['mlflow_parent_run']}, found {parents}")
    if len(kids) != summary["n_trials"] or len(trial_ids) != len(kids) or {k.data.tags["mlflow.parentRunId"] for k in kids} != {
            summary["mlflow_parent_run"]}:
        problems.append(f"expected {summary['n_trials']} trial runs (one per trial) under the parent, found "
                        f"{len(kids)} for {len(trial_ids)} trials")
    if parents and parents[0].info.status != "FINISHED":
        problems.append(f"the parent run ended {parents[0].info.status}")
    if not versions or not artifacts:
        problems.append("no registered model version or no artifacts in the shared folder")
    return problems


def _wait(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def cleanup(sshd: subprocess.Popen | None, keep: bool) -> None:
    """Stop what the cluster left behind (ray down leaves the MLflow server the head's start
    commands launched), then sshd, then the user (its home and the logs stay with --keep
    or after a failure)."""
    sh("pkill", "-KILL", "-u", USER, check=False)
    if sshd is not None:
        sshd.terminate()
        sshd.wait(timeout=30)
    if not keep:
        sh("userdel", "--remove", USER, check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(WORK, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the user, its home and the logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    preflight()
    sshd = None
    problems = ["a step failed (above)"]  # until every step ran
    started = time.monotonic()
    try:
        key = make_user()
        sshd = start_sshd()
        config = write_config(key)
        ray_cli("up", "-y", "--no-config-cache", str(config), timeout=2400, logfile=WORK / "ray_up.log")
        log.info("ray up: done in %.0f s", time.monotonic() - started)
        status = ray_cli("exec", str(config), "ray status", timeout=120, logfile=WORK / "ray_status.log")
        log.info("ray status on the head:\n%s", status[status.find("Node status"):status.find("From request")])
        _wait(lambda: _answers(f"{MLFLOW}/health"), 120, "the head's MLflow server")
        ray_cli("exec", str(config), "tail -n 5 ~/mlflow/server.log", timeout=120, logfile=WORK / "mlflow_log.log")
        t0 = time.monotonic()
        search_in_tmux_and_drop_it(config)
        summary = resume_search(config)
        log.info("search: %d trials (%s) in %.0f s, best %s", summary["n_trials"], summary.get("counts"),
                 time.monotonic() - t0, summary["best_trial"])
        problems = check_mlflow(summary)
        ray_cli("down", "-y", str(config), timeout=600, logfile=WORK / "ray_down.log")
        still = sh("pgrep", "-u", USER, "-f", "raylet|gcs_server", check=False, capture_output=True).stdout.split()
        if still:
            problems.append(f"ray down left Ray processes running: {still}")
    finally:
        cleanup(sshd, args.keep or bool(problems))
    for problem in problems:
        log.error("FAIL: %s", problem)
    log.info("%s in %.0f s", "FAILED" if problems else "PASSED", time.monotonic() - started)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
