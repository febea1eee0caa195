"""`cxrtune data inspect`: what a dataset holds, and what would bias a model trained on it.

An audit that always completes: class counts per split, patients, fine labels, what
the task drops and why, image sizes, unreadable files, near-duplicates and the
problems that would stop (or bias) training, such as a split without a class. It
builds no image cache: duplicate signatures come from an existing cache of the
configured size when there is one, else from a small temporary decode that is
removed afterwards. Leakage (one file in two splits, classes or patients; near-
duplicates across splits) is flagged in ``leakage``; the CLI then exits 1, and
``dedupe`` says what ``data.dedupe`` will do about the near-duplicates before training.

It also lists images that look off (``looks_off``): colour files whose channels differ
(a tinted scan, a photo of a film), extreme aspect ratios (a cropped strip, a
scanned page) and near-blank images. ``write_looks_off`` writes them as an exclusion
list ``data.exclude`` reads back, which keeps them out of training only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..config import DataConfig
from .cache import ImageCache, build_cache, existing_cache
from .dedupe import MOVED, REMOVED, DedupeContext, apply_dedupe
from .duplicates import DEFAULT_MIN_SIMILARITY, duplicate_groups, signatures_of
from .exclusions import data_base, relative_name, write_exclusions
from .labels import SCHEMES, Labelled, audit_scheme
from .pipeline import source_root, without_skipped
from .sources import read_source
from .splits import SPLIT_COLUMNS, draw_split, log_missing_patient_ids, patient_groups, uses_official_test

log = logging.getLogger(__name__)

# Side of the throwaway decode for signatures: the signature itself works on 32 px.
SIGNATURE_SIZE = 64

# What "looks off" means. A grey radiograph saved as RGB has equal channels (JPEG
# rounding moves them by a level or so); a tinted one differs by more than a few levels.
TINT_LEVELS = 4.0  # mean absolute difference of two colour channels, grey levels (0-255)
ASPECT_RANGE = (0.5, 2.0)  # width / height from the header; chest films are about 0.8-1.25
BLANK_STD = 4.0  # pixel standard deviation of the decoded image (radiographs: 40-70)
TINT_THUMBNAIL = 64  # side of the decode for the tint check: a colour cast shows at any size
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
LOOKS_OFF_KINDS = ("tinted", "extreme_aspect", "near_blank")


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


def _pixel_stds(images: np.ndarray, records: Sequence, rows: Sequence[int]) -> dict[str, float]:
    """Each record's pixel standard deviation, from the decode already made for the
    signatures (a blank image is blank at any size)."""
    return {str(r.path): float(np.asarray(images[i]).std()) for r, i in zip(records, rows)}


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
    name, root = source_root(cfg)
    audit = read_source(name, root)
    scheme = SCHEMES.get(cfg.task, where="data.task")
    labelled = audit_scheme(audit.records, scheme, cfg.min_class_count, source=cfg.source)
    problems = list(labelled.problems)
    paths = [str(r.path) for r in labelled.records]
    with tempfile.TemporaryDirectory(prefix="cxrtune-inspect-") as tmp:
        if paths:
            cache, sig_from = _signature_images(paths, cfg, Path(tmp), progress)
            labelled = without_skipped(labelled, cache)
            index = cache.index()
            rows = [index[str(r.path)] for r in labelled.records]
            sig = signatures_of(cache.images, rows)
            stds = _pixel_stds(cache.images, labelled.records, rows)
            skipped = list(cache.skipped)
        else:
            sig, sig_from, skipped, stds = np.zeros((0, 63), np.float32), "nothing to decode", [], {}
    if labelled.records:
        split, split_problems = draw_split(labelled, cfg, scheme.classes, _groups(labelled, sig, min_similarity))
        problems += split_problems
    else:
        split = pd.DataFrame(columns=list(SPLIT_COLUMNS))
    # The split may have dropped rows (official-test patients found in train): re-align.
    pos = {str(r.path): i for i, r in enumerate(labelled.records)}
    dup_groups = duplicate_groups(sig[[pos[p] for p in split["path"]]], min_similarity)
    crossing = _crossing(split, dup_groups)
    headers = dict(zip(split["path"], map(header_info, split["path"])))
    infos = [i for i in headers.values() if i is not None]
    looks_off = find_looks_off(headers, stds, data_base(root), cfg.workers)
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
        "dedupe": _dedupe_plan(split, dup_groups, labelled, cfg),
        "looks_off": looks_off,
        "looks_off_thresholds": {"tint_levels": TINT_LEVELS, "aspect_range": list(ASPECT_RANGE),
                                 "blank_std": BLANK_STD},
        "exclusions_file": None,
        "problems": problems,
        "leakage": leakage,
    }


def _crossing(split, groups: list[list[int]]) -> list[list[str]]:
    """Near-duplicate groups whose images sit in more than one split: leakage."""
    paths = split["path"].to_numpy()
    splits = split["split"].to_numpy()
    return [[f"{splits[i]}:{paths[i]}" for i in g] for g in groups if len(set(splits[g])) > 1]


def _dedupe_plan(split: pd.DataFrame, groups: list[list[int]], labelled: Labelled,
                 cfg: DataConfig) -> dict[str, Any]:
    """What ``data.dedupe`` will do before training: the same resolution prepare_data runs."""
    ctx = DedupeContext(uses_official_test(labelled, cfg), cfg.folds, cfg.fold)
    _, changes = apply_dedupe(split, groups, cfg.dedupe, ctx)
    n = Counter(c.action for c in changes)
    return {"mode": cfg.dedupe, "moved": n[MOVED], "removed": n[REMOVED]}


# ------------------------------------------------------------------ images that look off


def channel_difference(path: str) -> float | None:
    """The largest mean absolute difference between two colour channels of a small decode
    of ``path``, in grey levels; None for a file without colour channels (or unreadable:
    the cache build reports those)."""
    try:
        with Image.open(path) as im:
            if im.mode not in _COLOUR_MODES:
                return None
            if im.mode != "RGB":
                im = im.convert("RGB")
            # JPEG: decoded at 1/2..1/8 scale (draft); others reduced before resampling
            im.thumbnail((TINT_THUMBNAIL, TINT_THUMBNAIL))
            rgb = np.asarray(im, dtype=np.int16)
    except Exception:
        return None
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(max(np.abs(r - g).mean(), np.abs(g - b).mean(), np.abs(r - b).mean()))


def find_looks_off(headers: dict[str, tuple[int, int, str] | None], stds: dict[str, float], base: Path,
                   workers: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Images that look off, by kind (``LOOKS_OFF_KINDS``): ``headers`` maps each path to
    its header_info, ``stds`` to the pixel standard deviation of its decode."""
    colour = [p for p, h in headers.items() if h is not None and h[2] in _COLOUR_MODES]
    # decoding releases the GIL: threads decode the colour files' thumbnails in parallel
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        tints = dict(zip(colour, pool.map(channel_difference, colour)))
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in LOOKS_OFF_KINDS}
    for path, head in headers.items():
        name = relative_name(path, base)
        tint = tints.get(path)
        if tint is not None and tint > TINT_LEVELS:
            out["tinted"].append({"path": path, "name": name, "channel_difference": round(tint, 2)})
        if head is not None and head[1] > 0 and not ASPECT_RANGE[0] <= head[0] / head[1] <= ASPECT_RANGE[1]:
            out["extreme_aspect"].append({"path": path, "name": name, "width": head[0], "height": head[1],
                                          "aspect": round(head[0] / head[1], 3)})
        if path in stds and stds[path] < BLANK_STD:
            out["near_blank"].append({"path": path, "name": name, "std": round(stds[path], 2)})
    return out


def _why(kind: str, item: dict[str, Any]) -> str:
    if kind == "tinted":
        return (f"tinted: its colour channels differ by {item['channel_difference']:.1f} grey levels on "
                f"average (over {TINT_LEVELS:g})")
    if kind == "extreme_aspect":
        return (f"extreme aspect ratio: {item['width']}x{item['height']} px, width/height "
                f"{item['aspect']:.2f} (outside {ASPECT_RANGE[0]:g}-{ASPECT_RANGE[1]:g})")
    return f"near-blank: pixel standard deviation {item['std']:.1f} grey levels (under {BLANK_STD:g})"


def looks_off_items(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(relative path, why) of each image that looks off, once each, sorted by path."""
    why: dict[str, list[str]] = {}
    for kind in LOOKS_OFF_KINDS:
        for item in result["looks_off"][kind]:
            why.setdefault(item["name"], []).append(_why(kind, item))
    return [(name, "; ".join(why[name])) for name in sorted(why)]


def write_looks_off(result: dict[str, Any], path: str | Path) -> Path:
    """Write the images of ``result`` (an inspect_data result) that look off as an
    exclusion list for ``data.exclude``."""
    about = [f"Written by `cxrtune data inspect` for source {result['source']} at {result['root']}, "
             f"task {result['task']}: {sum(len(v) for v in result['looks_off'].values())} finding(s)."]
    return write_exclusions(path, looks_off_items(result), about)
