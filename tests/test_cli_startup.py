"""The CLI starts without the heavy libraries: configs, search spaces and the light
commands never import torch, scikit-learn, OpenCV, Ray, MLflow or Optuna (seconds and
a gigabyte of memory each time). Timings are measured by bench/bench_cli_startup.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxrtune.data.cxrnorm_config import METHODS
from cxrtune.data.sampler_names import SAMPLERS
from cxrtune.errors import ConfigError
from cxrtune.loss_config import LOSSES, WEIGHT_SCHEMES
from cxrtune.optim_config import OPTIMIZERS, SCHEDULES
from cxrtune.registry import Registry

HEAVY = ("torch", "torchvision", "sklearn", "cv2", "ray", "mlflow", "optuna")

# Runs in a fresh interpreter: this test process has long imported everything.
LIGHT_COMMANDS = f"""
import sys
from typer.testing import CliRunner
import cxrtune.config, cxrtune.space
from cxrtune.cli import app
for args, code in ((["--help"], 0), (["validate", "demo"], 0), (["data", "sources"], 0),
                   (["validate", "cxrnorm", "--set", "data.root=/nonexistent/cxrtune"], 2)):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, (args, result.output)
print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_light_commands_import_no_heavy_library(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", LIGHT_COMMANDS], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [], f"imported by the light commands: {out.stdout.strip()}"


@pytest.mark.parametrize("registry", [LOSSES, WEIGHT_SCHEMES, OPTIMIZERS, SCHEDULES, SAMPLERS, METHODS],
                         ids=lambda r: r.kind)
def test_every_declared_name_is_registered_by_its_provider(registry: Registry) -> None:
    for name in registry:
        assert registry.get(name) is not None


def test_declared_registry_rejects_undeclared_names() -> None:
    reg: Registry[int] = Registry("thing", names=("a",))
    reg.add("a", 1)
    with pytest.raises(KeyError, match="not among the declared names"):
        reg.add("b", 2)
    with pytest.raises(ConfigError, match="valid things: a"):
        reg.check("c")
