"""`cxrtune train`: one trial in-process, no Ray: the local single-GPU / CPU debug mode.

Writes to the output folder: the resolved config, a copy of the split, per-epoch
metrics (CSV and JSON lines), the latest checkpoint and the best one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from .config import TrialConfig, to_dict
from .data.pipeline import prepare_data
from .engine import fit
from .errors import ConfigError

log = logging.getLogger(__name__)

DEBUG_EPOCHS = 2
DEBUG_BATCHES = 3


def debug_config(cfg: TrialConfig) -> TrialConfig:
    """A few batches of one or two epochs, in the main process, so a user can step through it."""
    loop = dataclasses.replace(cfg.loop, epochs=min(cfg.loop.epochs, DEBUG_EPOCHS),
                               max_train_batches=DEBUG_BATCHES, max_eval_batches=DEBUG_BATCHES,
                               num_workers=0)
    return dataclasses.replace(cfg, loop=loop)


class LocalReporter:
    """Per-epoch metrics to CSV/JSON lines; the best checkpoint copied to ``best/``.

    On resume it continues the earlier files: rows of epochs being re-run are replaced
    and the best value so far is known, so ``best/`` is never overwritten by a worse one."""

    def __init__(self, out: Path, metric: str, mode: str) -> None:
        self.out, self.metric, self.mode = out, metric, mode
        self.rows = self._read(out / "metrics.jsonl")
        self.best: Optional[float] = None
        for row in self.rows:
            self._is_better(row[metric])

    @staticmethod
    def _read(path: Path) -> list[dict[str, float]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _is_better(self, value: float) -> bool:
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            return True
        return False

    def __call__(self, metrics: dict[str, float], checkpoint: Path) -> None:
        self.rows = [r for r in self.rows if r["epoch"] < metrics["epoch"]] + [metrics]
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        pd.DataFrame(self.rows).to_csv(self.out / "metrics.csv", index=False)
        if self._is_better(metrics[self.metric]):
            tmp = self.out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint, tmp)
            shutil.rmtree(self.out / "best", ignore_errors=True)
            tmp.rename(self.out / "best")


def _check_output(out: Path, resume: Optional[Path], overwrite: bool) -> None:
    """Refuse to train a fresh run over an earlier one's results (they would be lost)."""
    if resume is not None or not (out / "metrics.jsonl").exists():
        return
    if not overwrite:
        raise ConfigError(
            f"output folder {out} already holds a run (metrics.jsonl); continue it with --resume "
            f"{out / 'checkpoint'}, choose another --output, or pass --overwrite to replace it")
    (out / "metrics.jsonl").unlink()
    shutil.rmtree(out / "best", ignore_errors=True)


def train(cfg: TrialConfig, *, debug: bool = False, resume: Optional[Path] = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Prepare the data, train one trial and return its summary."""
    if debug:
        cfg = debug_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_output(out, resume, overwrite)
    data = prepare_data(cfg.data)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    shutil.copyfile(data.split_path, out / "split.csv")
    reporter = LocalReporter(out, cfg.loop.select_metric, cfg.loop.select_mode)
    progress = fit(cfg, data, reporter, workdir=out, resume=resume)
    last = progress.history[-1] if progress.history else {}
    return {"output_dir": str(out), "epochs": progress.epoch, "best": progress.best,
            "best_epoch": progress.best_epoch, "select_metric": cfg.loop.select_metric,
            "last": last, "best_checkpoint": str(out / "best"), "split_file": str(out / "split.csv")}
