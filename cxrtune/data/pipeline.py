"""From a DataConfig to images ready for training: the whole data side in one call.

source adapter -> manifest -> label scheme -> image cache -> patient-grouped split.
The driver of a search calls ``prepare_data`` once; trials only read what it built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig
from .cache import BadImage, ImageCache, build_cache
from .labels import SCHEMES, LabelScheme, Labelled, apply_scheme
from .manifest import Record
from .sources import load_records
from .splits import make_split, save_split, split_id
from .synthetic import ensure_synthetic

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


def source_records(cfg: DataConfig) -> list[Record]:
    """The manifest of the configured source; the synthetic default is generated on first use
    and then read through the CoronaHack adapter, exactly like the real dataset."""
    root = cfg.resolved_root()
    if cfg.source == "synthetic":
        return load_records("coronahack", ensure_synthetic(root, n=cfg.synthetic_n, seed=0))
    return load_records(cfg.source, root)


def label_records(cfg: DataConfig, records: list[Record]) -> tuple[LabelScheme, Labelled]:
    scheme = SCHEMES.get(cfg.task, where="data.task")
    labelled = apply_scheme(records, scheme, cfg.min_class_count, source=cfg.source)
    for fine, (n, reason) in labelled.dropped.items():
        log.warning("dropped %d %s image(s): %s", n, fine, reason)
    return scheme, labelled


def _without_skipped(labelled: Labelled, cache: ImageCache) -> Labelled:
    kept = set(cache.paths)
    pairs = [(r, t) for r, t in zip(labelled.records, labelled.targets) if str(r.path) in kept]
    return Labelled(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), labelled.dropped)


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Run the data side for ``cfg``: read the source, apply the task's label scheme,
    build (or reuse) the image cache and draw (and save) the split."""
    cfg.validate()
    scheme, labelled = label_records(cfg, source_records(cfg))
    cache = build_cache([r.path for r in labelled.records], cfg.image_size,
                        cfg.resolved_cache_dir(), on_bad_image=cfg.on_bad_image,
                        workers=cfg.workers, progress=progress)
    labelled = _without_skipped(labelled, cache)
    split = make_split(labelled, cfg, scheme.classes)
    index = cache.index()
    split = split.assign(row=[index[p] for p in split["path"]])
    path = cfg.resolved_cache_dir().parent / "splits" / f"{cfg.source}-{cfg.task}-{split_id(split, cfg)}.csv"
    save_split(split, path)
    log.info("split saved to %s (%s)", path, split["split"].value_counts().to_dict())
    return PreparedData(cfg, scheme, split, path, cache, labelled.dropped)
