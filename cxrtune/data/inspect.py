"""`cxrtune data inspect`: what a dataset holds, and what would bias a model trained on it.

Class counts per split, image sizes and bit depths, unreadable files, near-duplicates
(in particular across splits: leakage) and patients with several images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import DataConfig
from .duplicates import DEFAULT_MIN_SIMILARITY, duplicate_groups, signatures
from .pipeline import PreparedData, prepare_data

log = logging.getLogger(__name__)


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


def _duplicates(data: PreparedData, min_similarity: float) -> tuple[list[list[str]], list[list[str]]]:
    split = data.split
    groups = duplicate_groups(signatures(data.cache.images[split["row"].to_numpy()]), min_similarity)
    paths = split["path"].to_numpy()
    splits = split["split"].to_numpy()
    all_groups = [[str(paths[i]) for i in g] for g in groups]
    crossing = [[f"{splits[i]}:{paths[i]}" for i in g] for g in groups if len(set(splits[g])) > 1]
    return all_groups, crossing


def inspect_data(cfg: DataConfig, min_similarity: float = DEFAULT_MIN_SIMILARITY, progress: bool = True) -> dict[str, Any]:
    """Summarise the dataset of ``cfg`` as one JSON-able dict."""
    # Inspection must see every file, so bad images are skipped and listed, not fatal.
    data = prepare_data(dataclasses.replace(cfg, on_bad_image="skip"), progress=progress)
    split = data.split
    infos = [i for i in map(header_info, split["path"]) if i is not None]
    dup_groups, crossing = _duplicates(data, min_similarity)
    per_patient = split.loc[split["patient_id"] != "", "patient_id"].value_counts()
    return {
        "source": cfg.source,
        "root": str(cfg.resolved_root()),
        "task": cfg.task,
        "classes": list(data.scheme.classes),
        "n_images": int(len(split)),
        "n_patients": int(split["group"].nunique()),
        "class_counts": {c: int((split["target"] == c).sum()) for c in data.scheme.classes},
        "split_counts": {
            s: {c: int(((split["split"] == s) & (split["target"] == c)).sum()) for c in data.scheme.classes}
            for s in ("train", "val", "test")
        },
        "fine_label_counts": dict(Counter(split["label"]).most_common()),
        "dropped": {k: {"count": n, "reason": r} for k, (n, r) in data.dropped.items()},
        "unreadable": [b.path for b in data.skipped],
        "unreadable_reasons": {b.path: b.reason for b in data.skipped},
        "image_size": _size_summary(infos),
        "duplicate_groups": dup_groups,
        "cross_split_duplicates": crossing,
        "patients_with_several_images": int((per_patient > 1).sum()),
        "max_images_per_patient": int(per_patient.max()) if len(per_patient) else 1,
        "split_file": str(data.split_path),
        "cache": str(Path(data.cache.directory)),
    }
