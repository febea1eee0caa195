"""Train/val/test splits that keep every patient in one split.

The official test split is kept where the source has one (it is the number a
report quotes), otherwise a stratified, patient-grouped test split is drawn.
Train/val is drawn from the rest, stratified by class AND grouped by patient,
holding the asked fraction (to within one patient's images); with k folds
scikit-learn's StratifiedGroupKFold is used. Images without a patient id are
grouped by a case/patient number in their file name and by near-duplicate
clusters (``patient_groups``). Deterministic by seed; saved as a CSV so every
trial and every later report uses the same split.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..atomic import replacing_file
from ..config import DataConfig
from ..errors import DataError
from .dedupe import merge_linked
from .exclusions import exclusion_digest
from .labels import Labelled
from .manifest import Record

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("path", "label", "target", "patient_id", "group", "split", "fold")


# A case or patient number in a file name ("covid-19-pneumonia-case-12-a.jpg",
# "patient12_img3.png", "covid19-case001-fig1.png"): images of one case share it.
_NAME_CASE = re.compile(r"(?<![a-z])(case|patient|person|subject)[-_ ]?0*(\d+)(?!\d)")


def name_group(path: str | Path) -> str | None:
    """A grouping key from a case/patient number in the file name, or None.

    The text before the number stays part of the key, so "sars-case-3" and
    "covid-19-pneumonia-case-3" (two series of one source) are different cases.
    """
    stem = Path(path).stem.lower()
    m = _NAME_CASE.search(stem)
    if m is None:
        return None
    return f"name:{stem[:m.start()]}{m[1]}{int(m[2])}"


def patient_groups(records: Sequence[Record], duplicates: Iterable[Iterable[int]] = ()) -> list[str]:
    """The grouping key of each record: its patient id; else the case number in its file
    name; else the image itself. Records in one near-duplicate cluster (``duplicates``:
    lists of record indices) are merged into one group, with every image sharing a key
    with them, so one radiograph saved twice can never sit in two splits.

    Deterministic: a merged group is named by the smallest key it contains.
    """
    keys = [r.patient_id or name_group(r.path) or f"image:{r.path}" for r in records]
    return merge_linked(keys, duplicates)


def log_missing_patient_ids(records: Sequence[Record], groups: Sequence[str]) -> None:
    """Warn, with counts, when images have no patient id: their grouping is a guess."""
    no_id = [i for i, r in enumerate(records) if not r.patient_id]
    if not no_id:
        return
    size = Counter(groups)
    shared = [i for i in no_id if size[groups[i]] > 1]
    by_name = sum(1 for i in shared if name_group(records[i].path))
    log.warning(
        "%d of %d images have no patient id: %d share a group with other images (%d by a case/patient "
        "number in the file name, %d as near-duplicates), %d are each their own group (a patient's "
        "images may then sit in two splits; give a patient_id column in a CSV manifest to be sure)",
        len(no_id), len(records), len(shared), by_name, len(shared) - by_name, len(no_id) - len(shared))


def labelled_frame(labelled: Labelled, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per image: path, fine label, task class, patient, grouping key, official split."""
    if groups is None:
        groups = patient_groups(labelled.records)
    rows = [
        {
            "path": str(r.path),
            "label": r.label,
            "target": t,
            "patient_id": r.patient_id or "",
            "group": g,
            "official_split": r.split or "",
        }
        for r, t, g in zip(labelled.records, labelled.targets, groups)
    ]
    return pd.DataFrame(rows, columns=["path", "label", "target", "patient_id", "group", "official_split"])


def _group_fold(df: pd.DataFrame, n_splits: int, seed: int) -> np.ndarray:
    """Fold index per row: stratified by task class, grouped by patient (caller checks
    there are at least ``n_splits`` groups)."""
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, dtype=int)
    for k, (_, idx) in enumerate(sgkf.split(np.zeros(len(df)), df["target"], df["group"])):
        fold[idx] = k
    return fold


def grouped_holdout(df: pd.DataFrame, fraction: float, seed: int, stream: int) -> np.ndarray:
    """Rows of a stratified, patient-grouped holdout holding ``fraction`` of each class.

    K-fold splitters can only give 1/k; this takes whole groups, in a seeded random
    order, whenever taking one brings the per-class counts closer (L1) to
    ``fraction`` x class count. A rejected group only gets less useful as the
    holdout fills, so one pass suffices, and every class ends within half a group
    of its target. ``stream`` separates the test draw from the val draw.
    """
    table = pd.crosstab(df["group"], df["target"])  # rows sorted by group: order-independent
    counts = table.to_numpy(dtype=float)
    deficit = fraction * counts.sum(axis=0)
    take = np.zeros(len(table), dtype=bool)
    for i in np.random.default_rng([seed, stream]).permutation(len(table)):
        if np.abs(deficit - counts[i]).sum() < np.abs(deficit).sum():
            take[i] = True
            deficit -= counts[i]
    return df["group"].isin(set(table.index[take])).to_numpy()


def _too_few_groups(df: pd.DataFrame, parts: int, what: str, fix: str) -> str | None:
    n_groups = df["group"].nunique()
    if n_groups >= parts:
        return None
    return (f"cannot split {len(df)} images of {n_groups} patients/groups into {what}; fix: {fix}")


def _test_mask(df: pd.DataFrame, cfg: DataConfig, classes: tuple[str, ...],
               problems: list[str]) -> np.ndarray:
    official = (df["official_split"] == "test").to_numpy()
    if official.any() and not cfg.resplit_test:
        missing = sorted(set(classes) & set(df["target"]) - set(df.loc[official, "target"]))
        if missing:
            problems.append(
                f"the official test split of source {cfg.source!r} has no images of class(es) "
                f"{', '.join(missing)} for task {cfg.task!r} (CoronaHack's TEST part has no "
                "COVID-19 images, for example); fix: pass --resplit-test (or set "
                "data.resplit_test: true) to draw a new stratified, patient-grouped test split")
        return official
    problem = _too_few_groups(df, 3, "train, val and test",
                              "add data (every split needs whole patients of every class)")
    if problem:
        problems.append(problem)
        return np.zeros(len(df), dtype=bool)
    return grouped_holdout(df, cfg.test_fraction, cfg.split_seed, stream=0)


def _val_mask(pool: pd.DataFrame, cfg: DataConfig, problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(val rows, fold per row) of the train+val pool."""
    fold = np.full(len(pool), -1, dtype=int)
    if cfg.folds >= 2:
        problem = _too_few_groups(
            pool, cfg.folds, f"{cfg.folds} folds",
            f"use fewer folds (data.folds: {max(2, pool['group'].nunique())} or less), or 0 for "
            "a single train/val split")
        if problem:
            problems.append(problem)
            return np.zeros(len(pool), dtype=bool), fold
        fold = _group_fold(pool, cfg.folds, cfg.split_seed)
        return fold == cfg.fold, fold
    problem = _too_few_groups(pool, 2, "train and val", "add data")
    if problem:
        problems.append(problem)
        return np.zeros(len(pool), dtype=bool), fold
    return grouped_holdout(pool, cfg.val_fraction, cfg.split_seed, stream=1), fold


def uses_official_test(labelled: Labelled, cfg: DataConfig) -> bool:
    """Whether the test split is the source's official one (kept as published)."""
    return not cfg.resplit_test and any(r.split == "test" for r in labelled.records)


def draw_split(labelled: Labelled, cfg: DataConfig, classes: tuple[str, ...],
               groups: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Assign every image to train/val/test (and a fold when cfg.folds >= 2) without
    raising: what makes the split unusable is returned as problems (for `data inspect`).

    ``groups``: the grouping key per record (see :func:`patient_groups`); default:
    patient ids and case numbers in file names.
    """
    problems: list[str] = []
    df = labelled_frame(labelled, groups)
    drawn_test = cfg.resplit_test or not (df["official_split"] == "test").any()
    test = _test_mask(df, cfg, classes, problems)
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
    # The official val split (Kermany's has 16 images) is too small to select on, so it
    # is pooled with train and a proper grouped val split is drawn.
    pool = df.index[~test]
    val, fold = _val_mask(df.loc[pool], cfg, problems)
    df.loc[pool[val], "split"] = "val"
    if cfg.folds >= 2:
        df.loc[pool, "fold"] = fold
    per_split = df.groupby("group")["split"].nunique()
    if (per_split > 1).any():  # guards the invariant the whole module exists for
        raise AssertionError("internal: a patient landed in two splits")
    if not problems:
        problems += _missing_classes(df, cfg, classes, drawn_test)
    return df[list(SPLIT_COLUMNS)], problems


def make_split(labelled: Labelled, cfg: DataConfig, classes: tuple[str, ...],
               groups: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`draw_split`, raising DataError when the split is unusable."""
    df, problems = draw_split(labelled, cfg, classes, groups)
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else
                        f"{len(problems)} problems with the split:\n  " + "\n  ".join(problems))
    return df


def _missing_classes(df: pd.DataFrame, cfg: DataConfig, classes: tuple[str, ...],
                     drawn_test: bool) -> list[str]:
    """A split without a class cannot select on it (val) or score it (test)."""
    problems = []
    present = set(df["target"])
    for split in ("train", "val", "test"):
        part = df[df["split"] == split]
        missing = [c for c in classes if c in present and c not in set(part["target"])]
        for c in missing:
            n_groups = df.loc[df["target"] == c, "group"].nunique()
            problems.append(
                f"cannot split so that every split has every class: the {split} split would "
                f"have no {c} images ({int((df['target'] == c).sum())} {c} image(s) of "
                f"{n_groups} patient(s)/group(s) in all); fix: {_missing_class_fix(split, cfg, drawn_test)}")
    return problems


def _missing_class_fix(split: str, cfg: DataConfig, drawn_test: bool) -> str:
    fixes = ["add images of that class from more patients"]
    if split == "val" and cfg.folds < 2:
        fixes.append(f"a larger --val-fraction (or data.val_fraction; now {cfg.val_fraction})")
    if split == "test" and drawn_test:
        fixes.append(f"a larger --test-fraction (or data.test_fraction; now {cfg.test_fraction})")
    fixes.append("or choose a task without that class (--task, or data.task)")
    return ", ".join(fixes)


def split_id(df: pd.DataFrame, cfg: DataConfig) -> str:
    """A short hash of what the split depends on, for its file name. The dedupe mode and
    the exclusion list's content are part of it: another setting is another split file
    (moved images change no path, so the paths alone would not tell)."""
    h = hashlib.sha256()
    h.update(repr((cfg.source, cfg.task, cfg.split_seed, cfg.val_fraction, cfg.test_fraction,
                   cfg.resplit_test, cfg.folds, cfg.fold, cfg.min_class_count, cfg.dedupe,
                   exclusion_digest(cfg.exclude))).encode())
    h.update("\n".join(df["path"]).encode())
    return h.hexdigest()[:12]


def save_split(df: pd.DataFrame, path: Path) -> Path:
    """Write the split CSV atomically (a crash never leaves a half file a trial would read)."""
    with replacing_file(path) as tmp:
        df.to_csv(tmp, index=False)
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
