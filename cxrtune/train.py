"""`cxrtune train`: one trial in-process, no Ray: the local single-GPU / CPU debug mode.

Writes to the output folder: the resolved config, a copy of the split, per-epoch
metrics (CSV and JSON lines), the latest checkpoint and the best one. ``--debug``
writes to ``<output_dir>-debug``, so a debug run never blocks the real one.
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

from .atomic import replacing_dir, replacing_file, write_text
from .config import TrialConfig, to_dict
from .data.pipeline import prepare_data
from .engine import check_resume_config, fit, read_checkpoint
from .errors import ConfigError
from .selection import BestSoFar

log = logging.getLogger(__name__)

DEBUG_EPOCHS = 2
DEBUG_BATCHES = 3
DEBUG_SUFFIX = "-debug"


def debug_config(cfg: TrialConfig) -> TrialConfig:
    """A few batches of one or two epochs, in the main process, so a user can step through it.

    It writes to ``<output_dir>-debug``: in the folder of the real run, its results would
    make the next (real) ``cxrtune train`` refuse to overwrite them."""
    loop = dataclasses.replace(cfg.loop, epochs=min(cfg.loop.epochs, DEBUG_EPOCHS),
                               max_train_batches=DEBUG_BATCHES, max_eval_batches=DEBUG_BATCHES,
                               num_workers=0)
    out = cfg.output_dir.rstrip("/\\")
    out = out if out.endswith(DEBUG_SUFFIX) else out + DEBUG_SUFFIX
    return dataclasses.replace(cfg, loop=loop, output_dir=out)


class LocalReporter:
    """Per-epoch metrics to CSV/JSON lines; the best checkpoint copied to ``best/``.

    On resume it continues the earlier files: rows of epochs being re-run are replaced
    and the best value so far is known, so ``best/`` is never overwritten by a worse one."""

    def __init__(self, out: Path, metric: str, mode: str) -> None:
        self.out, self.metric = out, metric
        self.rows = self._read(out / "metrics.jsonl")
        self.best = BestSoFar(metric, mode)
        for row in self.rows:
            self.best.update(row.get(metric), row["epoch"])

    @staticmethod
    def _read(path: Path) -> list[dict[str, float]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def __call__(self, metrics: dict[str, float], checkpoint: Path) -> None:
        self.rows = [r for r in self.rows if r["epoch"] < metrics["epoch"]] + [metrics]
        write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        with replacing_file(self.out / "metrics.csv") as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        if self.best.update(metrics[self.metric], metrics["epoch"]):
            with replacing_dir(self.out / "best") as tmp:
                shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)


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
          overwrite: bool = False, resume_with_changes: bool = False) -> dict[str, Any]:
    """Prepare the data, train one trial and return its summary. ``resume`` must have
    been trained with ``cfg`` (see engine.RESUME_MAY_DIFFER) unless ``resume_with_changes``."""
    if debug:
        cfg = debug_config(cfg)
    if resume is not None:
        # before the data is prepared (minutes on a real dataset): a wrong --resume fails fast
        check_resume_config(resume, read_checkpoint(resume), cfg, resume_with_changes)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_output(out, resume, overwrite)
    data = prepare_data(cfg.data)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    shutil.copyfile(data.split_path, out / "split.csv")
    reporter = LocalReporter(out, cfg.loop.select_metric, cfg.loop.mode)
    progress = fit(cfg, data, reporter, workdir=out, resume=resume, allow_changes=resume_with_changes)
    last = progress.history[-1] if progress.history else {}
    return {"output_dir": str(out), "epochs": progress.epoch, "best": progress.best,
            "best_epoch": progress.best_epoch, "select_metric": cfg.loop.select_metric,
            "last": last, "best_checkpoint": str(out / "best"), "split_file": str(out / "split.csv")}
