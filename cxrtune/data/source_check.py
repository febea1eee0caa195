"""The cheap check of a DataConfig's source, for `cxrtune validate`: it reads the source's
listing but decodes nothing. It lives apart from ``pipeline.py`` (which re-exports it)
because the pipeline imports OpenCV and scikit-learn, which validating never needs."""

from __future__ import annotations

from ..config import DataConfig
from .sources import load_records


def check_source(cfg: DataConfig) -> None:
    """Raise DataError (ConfigError for a missing data.root) when the source of ``cfg``
    cannot be read: the root does not exist, the adapter finds no images there, or its
    metadata is unusable. Cheap: lists files, decodes nothing, builds no cache.

    ``source: synthetic`` is generated on first use, so there is nothing to check yet.
    """
    if cfg.source == "synthetic":
        return
    load_records(cfg.source, cfg.resolved_root())


__all__ = ["check_source"]
