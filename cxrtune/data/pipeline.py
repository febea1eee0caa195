"""From a DataConfig to images ready for training: the whole data side in one call.

source adapter -> manifest -> label scheme -> image cache -> patient-grouped split.
The driver of a search calls ``prepare_data`` once; trials only read what it built.
``check_source`` (from ``source_check.py``) is the cheap version for `cxrtune
validate`: it reads the source's listing but decodes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import DataConfig
from .cache import BadImage, ImageCache, build_cache
from .duplicates import DEFAULT_MIN_SIMILARITY, duplicate_groups, signature
from .labels import SCHEMES, LabelScheme, Labelled, apply_scheme
from .manifest import Record
from .source_check import check_source
from .sources import load_records
from .splits import log_missing_patient_ids, make_split, patient_groups, save_split, split_id
from .synthetic import ensure_synthetic

__all__ = ["PreparedData", "check_source", "label_records", "prepare_data", "record_groups",
           "source_records"]

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
                  min_similarity: float = DEFAULT_MIN_SIMILARITY) -> tuple[list[str], list[list[int]]]:
    """The split grouping key of each record (see ``splits.patient_groups``), and the
    near-duplicate clusters found (lists of record indices).

    Images without a patient id (CoronaHack's COVID-19 figures, folder sources, CSVs
    without patient_id) are merged by case numbers in their file names and by
    near-duplicate clusters. Signatures need decoded pixels, so they are taken from
    the cache (``images[rows[i]]`` is record i), and only for the images without an
    id: the cost is one 32 px DCT per such image.
    """
    no_id = [i for i, r in enumerate(records) if not r.patient_id]
    clusters: list[list[int]] = []
    if len(no_id) > 1:
        sig = np.stack([signature(np.asarray(images[rows[i]])) for i in no_id])
        clusters = [[no_id[j] for j in g] for g in duplicate_groups(sig, min_similarity)]
    groups = patient_groups(records, clusters)
    log_missing_patient_ids(records, groups)
    return groups, clusters


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Run the data side for ``cfg``: read the source, apply the task's label scheme,
    build (or reuse) the image cache and draw (and save) the split."""
    cfg.validate()
    scheme, labelled = label_records(cfg, source_records(cfg))
    cache = build_cache([r.path for r in labelled.records], cfg.image_size,
                        cfg.resolved_cache_dir(), on_bad_image=cfg.on_bad_image,
                        workers=cfg.workers, progress=progress)
    labelled = without_skipped(labelled, cache)
    index = cache.index()
    groups, clusters = record_groups(labelled.records, cache.images,
                                     [index[str(r.path)] for r in labelled.records])
    split = make_split(labelled, cfg, scheme.classes, groups)
    split = split.assign(row=[index[p] for p in split["path"]])
    path = cfg.resolved_cache_dir().parent / "splits" / f"{cfg.source}-{cfg.task}-{split_id(split, cfg)}.csv"
    save_split(split, path)
    log.info("split saved to %s (%s)", path, split["split"].value_counts().to_dict())
    duplicates = tuple(tuple(str(labelled.records[i].path) for i in c) for c in clusters)
    return PreparedData(cfg, scheme, split, path, cache, labelled.dropped, duplicates)
