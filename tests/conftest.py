"""Fixtures several test files share."""

from __future__ import annotations

import json
import sys

import pytest

from servers import TINY, cxrtune


@pytest.fixture(autouse=True)
def no_ray_left_connected():
    """Disconnect this process from Ray after each test. A test that joined Ray here and
    failed before its own ray.shutdown() would leave it connected to a cluster that a
    later `ray stop --force` kills, and the next test that starts Ray in this process
    would fail too ("ray.init twice"): one failure would read as several."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """The tiny demo search, run once as a user runs it (a subprocess, its own folder):
    (its folder, its JSON summary). The report, predict and serve tests read what it
    left: MLflow runs, the registered ``cxrtune-best``, the report bundle, optuna.db."""
    cwd = tmp_path_factory.mktemp("demo-search")
    sets = [a for s in [*TINY, "search.num_samples=4", "fixed.loop.epochs=3", "report.explain=true"]
            for a in ("--set", s)]
    proc = cxrtune(cwd, "search", "demo", "--json", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, json.loads(proc.stdout)
