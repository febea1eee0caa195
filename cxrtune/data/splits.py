"""Train/val/test splits that keep every patient in one split.

The official test split is kept where the source has one (it is the number a
report quotes), otherwise a stratified, patient-grouped test split is drawn.
Train/val is drawn from the rest, stratified by class AND grouped by patient
(scikit-learn's StratifiedGroupKFold), optionally as k folds. Deterministic by
seed; saved as a CSV so every trial and every later report uses the same split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..config import DataConfig
from ..errors import DataError
from .labels import Labelled

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("path", "label", "target", "patient_id", "group", "split", "fold")


def labelled_frame(labelled: Labelled) -> pd.DataFrame:
    """One row per image: path, fine label, task class, patient, grouping key, official split."""
    rows = [
        {
            "path": str(r.path),
            "label": r.label,
            "target": t,
            "patient_id": r.patient_id or "",
            # An image without a patient id is its own group.
            "group": r.patient_id or f"image:{r.path}",
            "official_split": r.split or "",
        }
        for r, t in zip(labelled.records, labelled.targets)
    ]
    return pd.DataFrame(rows)


def _group_fold(df: pd.DataFrame, n_splits: int, seed: int) -> np.ndarray:
    """Fold index per row: stratified by task class, grouped by patient."""
    n_groups = df["group"].nunique()
    if n_groups < n_splits:
        raise DataError(
            f"cannot split {len(df)} images of {n_groups} patients into {n_splits} parts; "
            "use a larger dataset or larger data.val_fraction / data.test_fraction")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, dtype=int)
    for k, (_, idx) in enumerate(sgkf.split(np.zeros(len(df)), df["target"], df["group"])):
        fold[idx] = k
    return fold


def _parts(fraction: float) -> int:
    """The number of folds whose one fold is ``fraction`` of the data."""
    return max(2, int(round(1.0 / fraction)))


def _test_mask(df: pd.DataFrame, cfg: DataConfig, classes: tuple[str, ...]) -> np.ndarray:
    official = (df["official_split"] == "test").to_numpy()
    if official.any() and not cfg.resplit_test:
        missing = sorted(set(classes) - set(df.loc[official, "target"]))
        if missing:
            raise DataError(
                f"the official test split of source {cfg.source!r} has no images of class(es) "
                f"{', '.join(missing)} for task {cfg.task!r} (CoronaHack's TEST part has no "
                "COVID-19 images, for example); set data.resplit_test: true to draw a new "
                "stratified, patient-grouped test split instead")
        return official
    return _group_fold(df, _parts(cfg.test_fraction), cfg.split_seed) == 0


def make_split(labelled: Labelled, cfg: DataConfig, classes: tuple[str, ...]) -> pd.DataFrame:
    """Assign every image to train/val/test (and a fold when cfg.folds >= 2)."""
    df = labelled_frame(labelled)
    test = _test_mask(df, cfg, classes)
    # An official test split can share patients with the official train split; those
    # train images would leak the test patients into training, so they are dropped.
    test_groups = set(df.loc[test, "group"])
    leaking = ~test & df["group"].isin(test_groups).to_numpy()
    if leaking.any():
        log.warning("dropped %d train/val images of %d patients that also appear in the test "
                    "split", int(leaking.sum()), df.loc[leaking, "group"].nunique())
    df = df[~leaking].reset_index(drop=True)
    test = test[~leaking]
    df["split"] = np.where(test, "test", "train")
    df["fold"] = -1
    pool = df.index[~test]
    # The official val split (Kermany's has 16 images) is too small to select on, so it
    # is pooled with train and a proper grouped val split is drawn.
    n_splits = cfg.folds if cfg.folds >= 2 else _parts(cfg.val_fraction)
    folds = _group_fold(df.loc[pool], n_splits, cfg.split_seed)
    df.loc[pool, "fold"] = folds
    val_fold = cfg.fold if cfg.folds >= 2 else 0
    df.loc[pool[folds == val_fold], "split"] = "val"
    if cfg.folds < 2:
        df["fold"] = -1
    _check_split(df, classes)
    return df[list(SPLIT_COLUMNS)]


def _check_split(df: pd.DataFrame, classes: tuple[str, ...]) -> None:
    per_split = df.groupby("group")["split"].nunique()
    if (per_split > 1).any():  # guards the invariant the whole module exists for
        raise AssertionError("internal: a patient landed in two splits")
    for split in ("train", "val"):
        missing = sorted(set(classes) - set(df.loc[df["split"] == split, "target"]))
        if missing:
            raise DataError(
                f"the {split} split has no images of class(es) {', '.join(missing)}: too few "
                "patients of that class to split; add data, lower data.min_class_count so the "
                "class is dropped, or choose a task without it")


def split_id(df: pd.DataFrame, cfg: DataConfig) -> str:
    """A short hash of what the split depends on, for its file name."""
    h = hashlib.sha256()
    h.update(repr((cfg.source, cfg.task, cfg.split_seed, cfg.val_fraction, cfg.test_fraction,
                   cfg.resplit_test, cfg.folds, cfg.fold, cfg.min_class_count)).encode())
    h.update("\n".join(df["path"]).encode())
    return h.hexdigest()[:12]


def save_split(df: pd.DataFrame, path: Path) -> Path:
    """Write the split CSV atomically (a crash never leaves a half file a trial would read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_split(path: Path) -> pd.DataFrame:
    """Read a split CSV written by save_split."""
    if not Path(path).is_file():
        raise DataError(f"split file {path} does not exist; run `cxrtune data split` or the search again")
    df = pd.read_csv(path, dtype={"patient_id": str, "group": str}, keep_default_na=False)
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"split file {path} lacks columns {missing}; delete it so it is redrawn")
    return df
