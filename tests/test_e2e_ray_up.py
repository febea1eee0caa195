"""`ray up` for real (scripts/e2e_ray_up.py): out of the default run (about 4 minutes,
needs root); run it with  python -m pytest -m e2e tests/test_e2e_ray_up.py"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "e2e_ray_up.py"


@pytest.mark.e2e
@pytest.mark.timeout(2400)
@pytest.mark.skipif(os.geteuid() != 0, reason="adds a user and runs sshd on 127.0.0.1:22: needs root")
def test_ray_up_search_and_ray_down_on_this_machine():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0 and "PASSED" in proc.stderr, proc.stderr[-5000:]
