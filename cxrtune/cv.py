"""Cross-validated trials: one trial trains a model per fold and reports the folds' mean.

With ``data.folds: K`` the split already assigns every train+val image to one of K
patient-grouped, stratified folds. A cross-validated trial (``search.cv: true``) trains
K models, model k validated on fold k and trained on the others, and steps them epoch by
epoch: each fold trains one more epoch (``engine.fit(until=...)``, resumed from its own
checkpoint, so a fold trains exactly as an uninterrupted run of it would), and then the
trial reports every validation metric as the mean over folds (``val/...``), its standard
deviation (``cv/std/val/...``) and each fold's value (``cv/fold<k>/val/...``). So ASHA
compares trials on fold means, and the best epoch is the one with the best mean. Early
stopping (``loop.early_stopping_patience``) watches the mean, not each fold.

The trial's checkpoint is a folder with one engine checkpoint per fold (``fold_<k>/``)
and ``cv.json``. Its test evaluation is the fold models' ensemble (``FoldEnsemble``: the
mean of their softmax outputs), or a model refit on train+val for the best epoch count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .atomic import write_text
from .config import TrialConfig
from .data.augment import eval_transform
from .data.dataset import CachedImages
from .data.pipeline import PreparedData
from .engine import CHECKPOINT_FILE, Evaluation, evaluate_checkpoint, fit, predict, split_metrics
from .metrics import confusion
from .models import logits_and_aux
from .selection import BestSoFar

log = logging.getLogger(__name__)

__all__ = ["CV_FILE", "FoldFailed", "refit_and_evaluate", "cv_state", "FoldEnsemble", "fold_data", "fold_dirs", "is_cv_checkpoint",
           "fit_cv", "evaluate_ensemble", "refit_data"]

CV_FILE = "cv.json"
_STD, _FOLD = "cv/std/", "cv/fold{k}/"


class FoldFailed(RuntimeError):
    """One fold of a cross-validated trial failed: the trial fails, naming the fold."""


def fold_data(data: PreparedData, k: int) -> PreparedData:
    """``data`` with fold ``k`` as the validation split and the other folds as training
    (the test split untouched)."""
    split = data.split.copy()
    pool = split["split"] != "test"
    split.loc[pool, "split"] = np.where(split.loc[pool, "fold"] == k, "val", "train")
    cfg = dataclasses.replace(data.cfg, fold=k)
    return dataclasses.replace(data, cfg=cfg, split=split)


def refit_data(data: PreparedData) -> PreparedData:
    """``data`` with every train+val image in training (the refit's); its "val" split is
    the training images again, evaluated only because every epoch evaluates."""
    split = data.split.copy()
    pool = split[split["split"] != "test"].assign(split="train")
    again = pool.assign(split="val")
    split = pd.concat([pool, again, split[split["split"] == "test"]], ignore_index=True)
    return dataclasses.replace(data, split=split)


def fold_dirs(checkpoint: Path) -> list[Path]:
    return sorted(Path(checkpoint).glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))


def is_cv_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / CV_FILE).is_file()


# ---------------------------------------------------------------- training


def _summarise(per_fold: Sequence[dict[str, float]]) -> dict[str, float]:
    """The folds' epoch metrics as one: means (the plain names), std and per-fold values."""
    out: dict[str, float] = {"epoch": per_fold[0]["epoch"]}
    keys = [k for k in per_fold[0] if k != "epoch" and not k.startswith("best")]
    for key in keys:
        values = np.array([m.get(key, math.nan) for m in per_fold], dtype=np.float64)
        if key.startswith("time/") or key == "cost/train_s":
            out[key] = float(values.sum())  # time the trial spent, all folds together
            continue
        out[key] = float(values.mean())
        if key.startswith("val/"):
            out[_STD + key] = float(values.std())
            out.update({_FOLD.format(k=k) + key: float(v) for k, v in enumerate(values)})
    return out


def _fold_epoch(cfg: TrialConfig, data: PreparedData, k: int, folds: int, work: Path, epoch: int,
                resume: Optional[Path]) -> dict[str, float]:
    """Fold ``k``'s next epoch (its checkpoint in ``work/fold_<k>/checkpoint``)."""
    got: dict[str, float] = {}

    def keep(metrics: dict[str, float], _checkpoint: Path) -> None:
        got.update(metrics)

    here = work / f"fold_{k}"
    previous = here / "checkpoint" if (here / "checkpoint" / CHECKPOINT_FILE).is_file() else resume
    try:
        fit(cfg, fold_data(data, k), keep, workdir=here, resume=previous, until=epoch)
    except Exception as exc:
        raise FoldFailed(f"fold {k} of {folds}: {type(exc).__name__}: {exc}") from exc
    return got


def cv_state(checkpoint: Optional[Path]) -> dict[str, Any]:
    """A cross-validated checkpoint's progress (``cv.json``): epoch, best mean, its epoch, history."""
    if checkpoint is None or not (checkpoint / CV_FILE).is_file():
        return {"epoch": 0, "best": None, "best_epoch": -1, "stale_epochs": 0, "history": []}
    return json.loads((checkpoint / CV_FILE).read_text())


def _checkpoint(work: Path, folds: int, state: dict[str, Any]) -> Path:
    """The trial's checkpoint folder: each fold's checkpoint and cv.json."""
    out = work / "cv"
    for k in range(folds):
        target = out / f"fold_{k}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / f"fold_{k}" / "checkpoint" / CHECKPOINT_FILE, target / CHECKPOINT_FILE)
    write_text(out / CV_FILE, json.dumps(state))
    return out


def fit_cv(cfg: TrialConfig, data: PreparedData, report: Callable[[dict[str, float], Path], None], *,
           workdir: Path, resume: Optional[Path] = None) -> dict[str, Any]:
    """Train the K fold models of ``cfg`` epoch by epoch, reporting the folds' summary
    (module docstring) and a checkpoint folder after each epoch. ``resume``: such a
    folder, to continue from. Returns the CV state (best mean and its epoch)."""
    folds = data.cfg.folds
    patience = cfg.loop.early_stopping_patience
    # each fold without early stopping of its own: the trial stops on the mean
    fold_cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, early_stopping_patience=0))
    state = cv_state(resume)
    best = BestSoFar(cfg.loop.select_metric, cfg.loop.mode, state["best"], state["best_epoch"])
    for epoch in range(state["epoch"] + 1, cfg.loop.epochs + 1):
        starts = [None if resume is None else resume / f"fold_{k}" for k in range(folds)]
        per_fold = [_fold_epoch(fold_cfg, data, k, folds, workdir, epoch, starts[k]) for k in range(folds)]
        metrics = _summarise(per_fold)
        if best.update(metrics[cfg.loop.select_metric], epoch):
            state.update(best=best.value, best_epoch=best.step, stale_epochs=0)
        else:
            state["stale_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(metrics)
        log.info("cv epoch %d/%d  %s %.4f (std %.4f over %d folds)", epoch, cfg.loop.epochs,
                 cfg.loop.select_metric, metrics[cfg.loop.select_metric],
                 metrics[_STD + cfg.loop.select_metric], folds)
        report({**metrics, "best": state["best"], "best_epoch": state["best_epoch"]},
               _checkpoint(workdir, folds, state))
        if patience and state["stale_epochs"] >= patience:
            log.info("early stopping: no improvement of the fold mean of %s for %d epochs",
                     cfg.loop.select_metric, patience)
            break
    return state


# ---------------------------------------------------------------- testing


class FoldEnsemble(nn.Module):
    """The fold models as one network: the log of the mean of their softmax outputs, so
    a softmax of its output is the ensemble's probabilities. Each member gets its input
    normalised with its own training statistics (``shifts``/``scales`` map the first
    member's normalisation, the one inputs come with, to each member's)."""

    def __init__(self, members: Sequence[nn.Module], stats: Sequence[tuple[float, float]]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        (mean0, std0), = stats[:1]
        self.register_buffer("scales", torch.tensor([std0 / s for _, s in stats], dtype=torch.float32))
        self.register_buffer("shifts", torch.tensor([(mean0 - m) / s for m, s in stats], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(logits_and_aux(net(x * self.scales[k] + self.shifts[k]))[0].float(), dim=1)
                 for k, net in enumerate(self.members)]
        return torch.log(torch.stack(probs).mean(0).clamp_min(torch.finfo(torch.float32).tiny))


def evaluate_ensemble(checkpoint: Path, data: PreparedData, split: str = "test",
                      device: Optional[torch.device] = None) -> Evaluation:
    """Score the fold models of a cross-validated checkpoint as their ensemble."""
    members = [evaluate_checkpoint(d, data, split, device) for d in fold_dirs(checkpoint)]
    first = members[0]
    model = FoldEnsemble([m.model for m in members], [m.input_stats for m in members]).to(first.device)
    mean, std = first.input_stats
    ds = CachedImages(first.images, data.rows(split), data.targets(split), eval_transform(mean, std))
    loader = DataLoader(ds, batch_size=first.config.loop.eval_batch_size)
    y_true, probs, loss = predict(model, loader, first.device, first.config)
    metrics = split_metrics(y_true, probs, loss, data, f"{split}/")
    prefix = f"{split}/"
    for k, m in enumerate(members):  # each fold model alone, for comparison: test/fold<k>/...
        metrics.update({f"{prefix}fold{k}/{key[len(prefix):]}": v for key, v in m.metrics.items()})
    conf = confusion(y_true, probs.argmax(1), data.scheme.num_classes)
    return dataclasses.replace(first, metrics=metrics, confusion=conf, y_true=y_true, probs=probs, model=model)


def refit_and_evaluate(checkpoint: Path, data: PreparedData, best_epoch: int, split: str = "test",
                       device: Optional[torch.device] = None) -> Evaluation:
    """Train the trial's configuration again on train+val, for its best epoch count (on its
    schedule for loop.epochs, as the folds were), and score that model on ``split``.
    It trains where the caller runs (the search's driver)."""
    import tempfile

    from .config import from_dict
    from .engine import read_checkpoint

    cfg = from_dict(TrialConfig, read_checkpoint(fold_dirs(checkpoint)[0])["config"])
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, early_stopping_patience=0))
    log.info("refitting the chosen trial on train+val for %d epochs (the 'val' scores it logs are of its "
             "training images, not a validation)", best_epoch)
    with tempfile.TemporaryDirectory(prefix="cxrtune-refit-") as work:
        fit(cfg, refit_data(data), workdir=Path(work), device=device, until=best_epoch)
        return evaluate_checkpoint(Path(work) / "checkpoint", data, split, device)
