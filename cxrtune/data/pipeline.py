"""From a DataConfig to images ready for training: the whole data side in one call.

source adapter -> manifest -> label scheme -> image cache -> patient-grouped split.
The driver of a search calls ``prepare_data`` once; trials only read what it built.
``check_source`` (from ``source_check.py``) is the cheap version for `cxrtune
validate`: it reads the source's listing but decodes nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..config import DataConfig
from .cache import BadImage, ImageCache, build_cache
from ..errors import DataError
from .dedupe import REMOVED, DedupeContext, SplitChange, apply_dedupe, change_counts, save_changes
from .duplicates import DEFAULT_MIN_SIMILARITY, duplicate_groups, signatures_of
from .exclusions import apply_exclusions, data_base, read_exclusions
from .labels import SCHEMES, LabelScheme, Labelled, apply_scheme
from .manifest import Record
from .source_check import check_source
from .sources import load_records
from .splits import (log_missing_patient_ids, make_split, patient_groups, save_split, split_id,
                     uses_official_test)
from .synthetic import ensure_synthetic

__all__ = ["PreparedData", "check_source", "label_records", "prepare_data", "record_groups",
           "resolve_split", "source_records"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """Everything a trial needs to read its images: the cache, and a split whose
    ``row`` column indexes the cache."""

    cfg: DataConfig
    scheme: LabelScheme
    split: pd.DataFrame  # SPLIT_COLUMNS + "row"
    split_path: Path
    cache: ImageCache
    dropped: dict[str, tuple[int, str]]  # fine label -> (count, reason)
    duplicate_clusters: tuple[tuple[str, ...], ...] = ()  # near-duplicate images grouped for the split (paths)
    # images removed from (or moved between) splits by data.dedupe, data.exclude and the
    # split itself, and the CSV beside the split file listing them (None: nothing changed)
    removed: tuple[SplitChange, ...] = ()
    removed_path: Optional[Path] = None

    def rows(self, split: str) -> np.ndarray:
        """Cache rows of one split, in split-file order."""
        return self.split.loc[self.split["split"] == split, "row"].to_numpy()

    def targets(self, split: str) -> np.ndarray:
        """Class indices of one split, aligned with ``rows(split)``."""
        sel = self.split.loc[self.split["split"] == split, "target"]
        return np.array([self.scheme.index_of(t) for t in sel], dtype=np.int64)

    @property
    def skipped(self) -> tuple[BadImage, ...]:
        return self.cache.skipped

    def change_counts(self) -> dict[str, int]:
        """Images moved / removed as duplicates / excluded / dropped by the split (run params)."""
        return change_counts(self.removed)


def source_root(cfg: DataConfig) -> tuple[str, Path]:
    """(adapter name, root) of the configured source; the synthetic default is generated on
    first use and then read through the CoronaHack adapter, exactly like the real dataset."""
    root = cfg.resolved_root()
    if cfg.source == "synthetic":
        return "coronahack", ensure_synthetic(root, n=cfg.synthetic_n, seed=0)
    return cfg.source, root


def source_records(cfg: DataConfig) -> list[Record]:
    """The manifest of the configured source (see :func:`source_root`)."""
    return load_records(*source_root(cfg))


def label_records(cfg: DataConfig, records: list[Record]) -> tuple[LabelScheme, Labelled]:
    scheme = SCHEMES.get(cfg.task, where="data.task")
    labelled = apply_scheme(records, scheme, cfg.min_class_count, source=cfg.source)
    for fine, (n, reason) in labelled.dropped.items():
        log.warning("dropped %d %s image(s): %s", n, fine, reason)
    return scheme, labelled


def without_skipped(labelled: Labelled, cache: ImageCache) -> Labelled:
    kept = set(cache.paths)
    pairs = [(r, t) for r, t in zip(labelled.records, labelled.targets) if str(r.path) in kept]
    return Labelled(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), labelled.dropped,
                    labelled.problems)


def record_groups(records: Sequence[Record], images: np.ndarray, rows: Sequence[int],
                  min_similarity: float = DEFAULT_MIN_SIMILARITY,
                  sig: np.ndarray | None = None) -> tuple[list[str], list[list[int]]]:
    """The split grouping key of each record (see ``splits.patient_groups``), and the
    near-duplicate clusters found (lists of record indices).

    Images without a patient id (CoronaHack's COVID-19 figures, folder sources, CSVs
    without patient_id) are merged by case numbers in their file names and by
    near-duplicate clusters. Signatures need decoded pixels, so they are taken from
    the cache (``images[rows[i]]`` is record i), and only for the images without an
    id (the cost is one 32 px DCT per such image), unless ``sig`` (every record's
    signature, in record order) is given.
    """
    no_id = [i for i, r in enumerate(records) if not r.patient_id]
    clusters: list[list[int]] = []
    if len(no_id) > 1:
        sig_no_id = sig[no_id] if sig is not None else signatures_of(images, [rows[i] for i in no_id])
        clusters = [[no_id[j] for j in g] for g in duplicate_groups(sig_no_id, min_similarity)]
    groups = patient_groups(records, clusters)
    log_missing_patient_ids(records, groups)
    return groups, clusters


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Run the data side for ``cfg``: read the source, apply the task's label scheme,
    build (or reuse) the image cache, draw the split, resolve near-duplicates
    (``data.dedupe``), remove excluded train images (``data.exclude``) and save the
    split, with a CSV of what was removed or moved beside it."""
    cfg.validate()
    name, root = source_root(cfg)
    scheme, labelled = label_records(cfg, load_records(name, root))
    cache = build_cache([r.path for r in labelled.records], cfg.image_size,
                        cfg.resolved_cache_dir(), on_bad_image=cfg.on_bad_image,
                        workers=cfg.workers, progress=progress)
    labelled = without_skipped(labelled, cache)
    index = cache.index()
    rows = [index[str(r.path)] for r in labelled.records]
    # every image's signature when duplicates are resolved; else only what grouping needs
    sig = signatures_of(cache.images, rows) if cfg.dedupe != "off" else None
    groups, clusters = record_groups(labelled.records, cache.images, rows, sig=sig)
    drawn = make_split(labelled, cfg, scheme.classes, groups)
    split, changes = resolve_split(drawn, labelled, sig, cfg, data_base(root))
    _check_every_class_left(drawn, split, changes, cfg, scheme.classes)
    split = split.assign(row=[index[p] for p in split["path"]])
    path = cfg.resolved_cache_dir().parent / "splits" / f"{cfg.source}-{cfg.task}-{split_id(split, cfg)}.csv"
    save_split(split, path)
    removed_path = save_changes(changes, path)
    log.info("split saved to %s (%s)", path, split["split"].value_counts().to_dict())
    if removed_path is not None:
        log.warning("%s images changed split or left it: %s; each is listed in %s",
                    len(changes), change_counts(changes), removed_path)
    duplicates = tuple(tuple(str(labelled.records[i].path) for i in c) for c in clusters)
    return PreparedData(cfg, scheme, split, path, cache, labelled.dropped, duplicates, tuple(changes),
                        removed_path)


def resolve_split(split: pd.DataFrame, labelled: Labelled, sig: np.ndarray | None, cfg: DataConfig,
                  base: Path) -> tuple[pd.DataFrame, list[SplitChange]]:
    """The drawn split after data.dedupe, then data.exclude, and every change made.

    Duplicates first: where a group lands never depends on the exclusion list, so val and
    test are the same images with any list (exclusions only ever leave train)."""
    changes = _dropped_by_split(labelled, split)
    if sig is not None:
        pos = {str(r.path): i for i, r in enumerate(labelled.records)}
        clusters = duplicate_groups(sig[[pos[p] for p in split["path"]]])
        ctx = DedupeContext(uses_official_test(labelled, cfg), cfg.folds, cfg.fold)
        split, found = apply_dedupe(split, clusters, cfg.dedupe, ctx)
        changes += found
    if cfg.exclude is not None:
        split, excluded = apply_exclusions(split, read_exclusions(cfg.exclude), base)
        changes += excluded
    return split, changes


def _dropped_by_split(labelled: Labelled, split: pd.DataFrame) -> list[SplitChange]:
    """The images ``draw_split`` left out: train/val images of patients of the official
    test split (it logs them; here they join the record of what the split removed)."""
    kept = set(split["path"])
    return [SplitChange(str(r.path), REMOVED, r.split or "train", "",
                        "its patient/group is in the official test split", r.patient_id or "", "split")
            for r in labelled.records if str(r.path) not in kept]


def _check_every_class_left(drawn: pd.DataFrame, split: pd.DataFrame, changes: Sequence[SplitChange],
                            cfg: DataConfig, classes: Sequence[str]) -> None:
    """The drawn split had every class in every split; dedupe or exclusions may have
    emptied one: an error naming the split, the class, the cause and the fix."""
    target = dict(zip(drawn["path"], drawn["target"]))
    problems = []
    for part in ("train", "val", "test"):
        before = set(drawn.loc[drawn["split"] == part, "target"])
        after = set(split.loc[split["split"] == part, "target"])
        for c in (c for c in classes if c in before and c not in after):
            causes = Counter(ch.cause for ch in changes if ch.from_split == part and target.get(ch.path) == c)
            problems.append(
                f"the {part} split has no {c} images left after " + ", ".join(
                    f"{_CAUSES[k]} {n}" for k, n in sorted(causes.items())) + f"; fix: {_fix(cfg, causes)}")
    if problems:
        raise DataError("\n".join(problems))


_CAUSES = {"dedupe": "data.dedupe moved or removed", "exclude": "data.exclude removed",
           "split": "the split dropped"}


def _fix(cfg: DataConfig, causes: Counter) -> str:
    fixes = []
    if causes["exclude"]:
        fixes.append(f"list fewer images in {cfg.exclude} (data.exclude)")
    if causes["dedupe"]:
        fixes.append(f"another data.dedupe than {cfg.dedupe!r} (within_split or off keep more images)")
    return ", or ".join(fixes + ["add images of that class"])
