"""CLI startup: wall time of the light commands, each run as a fresh process.

`cxrtune --help`, `cxrtune validate demo` and `cxrtune data sources` need no deep
learning library; the baseline is what each of them used to pay before its own work,
`python -c "import torch, torchvision"`, timed the same way on the same machine.
Target: every command under 1.5 s.

    python bench/bench_cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_cli_startup")

COMMANDS = (["--help"], ["validate", "demo"], ["data", "sources"])
BASELINE = [sys.executable, "-c", "import torch, torchvision"]


def cxrtune_command() -> list[str]:
    """The installed console script next to this interpreter (a version manager's shim on
    PATH adds its own startup), else the module."""
    script = Path(sys.executable).with_name("cxrtune")
    if script.is_file():
        return [str(script)]
    found = shutil.which("cxrtune")
    return [found] if found else [sys.executable, "-m", "cxrtune.cli"]


def median_seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of ``repeats`` fresh runs of ``argv`` (each must succeed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cxrtune = cxrtune_command()
    median_seconds(cxrtune + ["--help"], 1)  # warm the file cache: every run then reads the same
    baseline_s = median_seconds(BASELINE, args.repeats)
    seconds = {" ".join(cmd): median_seconds(cxrtune + cmd, args.repeats) for cmd in COMMANDS}
    log.info("median wall time of %d fresh processes:", args.repeats)
    log.info("  %-40s %6.2f s  (baseline)", "python -c 'import torch, torchvision'", baseline_s)
    for cmd, s in seconds.items():
        log.info("  %-40s %6.2f s  %.2fx of the baseline", f"cxrtune {cmd}", s, s / baseline_s)
    print(json.dumps({
        "bench": "cli_startup", "repeats": args.repeats, "baseline_import_torch_s": round(baseline_s, 3),
        "commands_s": {cmd: round(s, 3) for cmd, s in seconds.items()},
        "ratio_to_baseline": {cmd: round(s / baseline_s, 3) for cmd, s in seconds.items()},
        "max_s": round(max(seconds.values()), 3), "target_s": 1.5,
    }))


if __name__ == "__main__":
    main()
