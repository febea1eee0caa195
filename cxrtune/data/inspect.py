"""`cxrtune data inspect`: what a dataset holds, and what would bias a model trained on it.

An audit that always completes: class counts per split, patients, fine labels, what
the task drops and why, image sizes, unreadable files, near-duplicates and the
problems that would stop (or bias) training, such as a split without a class. It
builds no image cache: duplicate signatures come from an existing cache of the
configured size when there is one, else from a small temporary decode that is
removed afterwards. Leakage (one file in two splits, classes or patients; near-
duplicates across splits) is flagged in ``leakage``; the CLI then exits 1.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..config import DataConfig
from .cache import ImageCache, build_cache, existing_cache
from .duplicates import DEFAULT_MIN_SIMILARITY, duplicate_groups, signatures
from .labels import SCHEMES, Labelled, audit_scheme
from .pipeline import source_root, without_skipped
from .sources import read_source
from .splits import SPLIT_COLUMNS, draw_split, log_missing_patient_ids, patient_groups

log = logging.getLogger(__name__)

# Side of the throwaway decode for signatures: the signature itself works on 32 px.
SIGNATURE_SIZE = 64


def header_info(path: str) -> tuple[int, int, str] | None:
    """(width, height, pixel format) from the file header alone, without decoding pixels."""
    try:
        if path.lower().endswith(".dcm"):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows), f"DICOM {int(ds.BitsStored)}-bit"
        with Image.open(path) as im:
            return im.width, im.height, im.mode
    except Exception:  # unreadable files are reported from the cache build
        return None


def _size_summary(infos: list[tuple[int, int, str]]) -> dict[str, Any]:
    if not infos:
        return {}
    w = np.array([i[0] for i in infos])
    h = np.array([i[1] for i in infos])
    stats = {}
    for name, v in (("width", w), ("height", h)):
        stats[name] = {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}
    stats["pixel_formats"] = dict(Counter(i[2] for i in infos).most_common())
    return stats


def _signature_images(paths: Sequence[str], cfg: DataConfig, tmp: Path, progress: bool) -> tuple[ImageCache, str]:
    """Decoded pixels for the duplicate signatures, without leaving a cache behind."""
    cache = existing_cache(paths, cfg.image_size, cfg.resolved_cache_dir())
    if cache is not None:
        return cache, f"the {cfg.image_size} px cache at {cache.directory}"
    # Inspection must see every file, so bad images are skipped and listed, not fatal.
    cache = build_cache(paths, SIGNATURE_SIZE, tmp, on_bad_image="skip", workers=cfg.workers,
                        progress=progress)
    return cache, f"a temporary {SIGNATURE_SIZE} px decode (removed)"


def _groups(labelled: Labelled, sig: np.ndarray, min_similarity: float) -> list[str]:
    """Same grouping as prepare_data: near-duplicates among the images without a patient id."""
    no_id = [i for i, r in enumerate(labelled.records) if not r.patient_id]
    clusters = [[no_id[j] for j in g] for g in duplicate_groups(sig[no_id], min_similarity)] if no_id else []
    groups = patient_groups(labelled.records, clusters)
    log_missing_patient_ids(labelled.records, groups)
    return groups


def inspect_data(cfg: DataConfig, min_similarity: float = DEFAULT_MIN_SIMILARITY, progress: bool = True) -> dict[str, Any]:
    """Summarise the dataset of ``cfg`` as one JSON-able dict; problems are listed, not raised.

    Raises only when there is nothing to audit (no root, no images, unreadable metadata).
    """
    audit = read_source(*source_root(cfg))
    scheme = SCHEMES.get(cfg.task, where="data.task")
    labelled = audit_scheme(audit.records, scheme, cfg.min_class_count, source=cfg.source)
    problems = list(labelled.problems)
    paths = [str(r.path) for r in labelled.records]
    with tempfile.TemporaryDirectory(prefix="cxrtune-inspect-") as tmp:
        if paths:
            cache, sig_from = _signature_images(paths, cfg, Path(tmp), progress)
            labelled = without_skipped(labelled, cache)
            index = cache.index()
            sig = signatures(_Rows(cache.images, [index[str(r.path)] for r in labelled.records]))
            skipped = list(cache.skipped)
        else:
            sig, sig_from, skipped = np.zeros((0, 63), np.float32), "nothing to decode", []
    if labelled.records:
        split, split_problems = draw_split(labelled, cfg, scheme.classes, _groups(labelled, sig, min_similarity))
        problems += split_problems
    else:
        split = pd.DataFrame(columns=list(SPLIT_COLUMNS))
    # The split may have dropped rows (official-test patients found in train): re-align.
    pos = {str(r.path): i for i, r in enumerate(labelled.records)}
    dup_groups = duplicate_groups(sig[[pos[p] for p in split["path"]]], min_similarity)
    crossing = _crossing(split, dup_groups)
    infos = [i for i in map(header_info, split["path"]) if i is not None]
    per_patient = split.loc[split["patient_id"] != "", "patient_id"].value_counts()
    leakage = [f"listed twice: {c}" for c in audit.conflicts]
    leakage += [f"near-duplicates in two splits: {' == '.join(g)}" for g in crossing]
    problems += leakage
    return {
        "source": cfg.source,
        "root": str(cfg.resolved_root()),
        "task": cfg.task,
        "classes": list(scheme.classes),
        "min_class_count": cfg.min_class_count,
        "n_images": int(len(split)),
        "n_patients": int(split["group"].nunique()),
        "images_without_patient_id": int((split["patient_id"] == "").sum()),
        "class_counts": {c: int((split["target"] == c).sum()) for c in scheme.classes},
        "split_counts": {
            s: {c: int(((split["split"] == s) & (split["target"] == c)).sum()) for c in scheme.classes}
            for s in ("train", "val", "test")
        },
        "fine_label_counts": dict(Counter(r.label for r in audit.records).most_common()),
        "dropped": {k: {"count": n, "reason": r} for k, (n, r) in labelled.dropped.items()},
        "unreadable": [b.path for b in skipped],
        "unreadable_reasons": {b.path: b.reason for b in skipped},
        "image_size": _size_summary(infos),
        "smaller_than_image_size": sum(1 for i in infos if min(i[0], i[1]) < cfg.image_size),
        "duplicate_groups": [[str(split["path"].iat[i]) for i in g] for g in dup_groups],
        "cross_split_duplicates": crossing,
        "repeated_rows": audit.repeated,
        "conflicting_rows": audit.conflicts,
        "patients_with_several_images": int((per_patient > 1).sum()),
        "max_images_per_patient": int(per_patient.max()) if len(per_patient) else 1,
        "signatures_from": sig_from,
        "problems": problems,
        "leakage": leakage,
    }


class _Rows:
    """A lazy view of the cache rows of the records, in record order (no copy of the pixels)."""

    def __init__(self, images: np.ndarray, rows: list[int]) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[self.rows[i]]


def _crossing(split, groups: list[list[int]]) -> list[list[str]]:
    """Near-duplicate groups whose images sit in more than one split: leakage."""
    paths = split["path"].to_numpy()
    splits = split["split"].to_numpy()
    return [[f"{splits[i]}:{paths[i]}" for i in g] for g in groups if len(set(splits[g])) > 1]
