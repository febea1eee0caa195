"""SYNTHETIC chest X-ray phantoms -- NOT medical images -- for demos and tests.

No real chest X-ray dataset can ship with cxrtune, so the embedded default dataset
is generated: cartoon "chest-like" grayscale phantoms drawn with numpy/OpenCV
(body outline, two darker lung fields, bright mediastinum, spine, ribs and
clavicles) with a simulated finding per class:

* ``normal``    -- no finding;
* ``bacterial`` -- a dense focal consolidation in one lung (mid/lower zone);
* ``viral``     -- bilateral diffuse interstitial (reticular) haze;
* ``covid``     -- bilateral peripheral ground-glass opacities in the lower zones.

Finding strength varies per image, so the task is learnable but not trivial.
Strong "scanner" variation (contrast, gamma, brightness, exposure gradient, blur,
Gaussian / salt-and-pepper noise, burned-in text marks, image size and aspect,
8-bit / 16-bit / 12-bit-in-16 / RGB encodings) makes normalisation matter.

These images carry no clinical information whatsoever. They exist only so that the
pipeline (source adapters, splitting, caching, normalisation, training, search) can
be demonstrated and tested end to end without downloading anything.

The files are written in the on-disk layout of a real dataset (``LAYOUTS``):
``coronahack`` (CoronaHack metadata CSV + flat image folders), ``kermany``
(chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}) or ``imagefolder``
(one folder per class), so the real source adapters read them unchanged.

Everything is deterministic by seed: every image is drawn from its own child seed
(``SeedSequence(seed, spawn_key=(1, index))``), so the same seed gives byte-identical
files regardless of generation order.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..atomic import replacing_file
from ..errors import ConfigError, DataError
from ..registry import Registry
from .sources import CORONAHACK_COLUMNS as METADATA_COLUMNS
from .sources import CORONAHACK_CSV, CORONAHACK_IMAGES

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1
MARKER_NAME = ".cxrtune-synthetic.json"
CORONAHACK_DIR = (CORONAHACK_IMAGES, CORONAHACK_IMAGES)
CORONAHACK_COLUMNS = ("", *METADATA_COLUMNS)  # the real file's first column has no name
KERMANY_DIR = "chest_xray"

CLASSES = ("normal", "bacterial", "viral", "covid")
# CoronaHack-like balance (covid is further raised to a minimum, see _class_counts).
_CLASS_SHARE = {"normal": 0.27, "bacterial": 0.47, "viral": 0.24, "covid": 0.025}
# Images per patient: sizes and their probabilities, per class.
_GROUP_SIZES = (1, 2, 3)
_GROUP_P = {
    "normal": (0.75, 0.2, 0.05),
    "bacterial": (0.6, 0.28, 0.12),
    "viral": (0.65, 0.25, 0.1),
    "covid": (0.5, 0.35, 0.15),
}
_TEST_SHARE = 0.15
_VAL_SHARE = 0.02

# Top-level entries a generated dataset may own inside ``out`` (any layout).
_DATASET_ENTRIES = (
    MARKER_NAME,
    CORONAHACK_CSV,
    CORONAHACK_DIR[0],
    KERMANY_DIR,
    *CLASSES,
)

LAYOUTS: Registry[Callable[..., dict]] = Registry("layout")


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Image:
    index: int  # child-seed key: the image's pixels depend only on (seed, index, label)
    label: str  # one of CLASSES
    patient: int  # generated patient number
    k: int  # image number within the patient (0-based)
    split: str  # "train" | "val" | "test"


@dataclass(frozen=True)
class _Patient:
    label: str
    size: int
    split: str


def _class_counts(n: int) -> dict[str, int]:
    covid = max(round(_CLASS_SHARE["covid"] * n), min(8, n // 20))
    rest = n - covid
    others = ("normal", "bacterial", "viral")
    total = sum(_CLASS_SHARE[c] for c in others)
    exact = {c: rest * _CLASS_SHARE[c] / total for c in others}
    counts = {c: int(np.floor(v)) for c, v in exact.items()}
    by_remainder = sorted(others, key=lambda c: (counts[c] - exact[c], others.index(c)))
    for c in by_remainder[: rest - sum(counts.values())]:
        counts[c] += 1
    counts["covid"] = covid
    return {c: counts[c] for c in CLASSES}


def _make_plan(n: int, seed: int) -> tuple[list[_Patient], list[_Image]]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    counts = _class_counts(n)
    groups: list[tuple[str, int]] = []
    for label in CLASSES:
        remaining = counts[label]
        while remaining > 0:
            size = min(remaining, int(rng.choice(_GROUP_SIZES, p=_GROUP_P[label])))
            groups.append((label, size))
            remaining -= size
    splits = ["train"] * len(groups)
    for label in CLASSES:
        if label == "covid":  # like CoronaHack: no COVID-19 in TEST
            continue
        members = [i for i, (lab, _) in enumerate(groups) if lab == label]
        order = [members[j] for j in rng.permutation(len(members))]
        total = counts[label]
        targets = (
            ("test", round(_TEST_SHARE * total)),
            ("val", max(1, round(_VAL_SHARE * total)) if total >= 10 else 0),
        )
        pos = 0
        for split, target in targets:
            got = 0
            while got < target and pos < len(order) - 1:  # keep >= 1 patient in train
                splits[order[pos]] = split
                got += groups[order[pos]][1]
                pos += 1
    patients = [_Patient(lab, size, sp) for (lab, size), sp in zip(groups, splits)]
    patients = [patients[j] for j in rng.permutation(len(patients))]
    images: list[_Image] = []
    for p_idx, p in enumerate(patients):
        for k in range(p.size):
            images.append(_Image(len(images), p.label, p_idx, k, p.split))
    return patients, images


# ---------------------------------------------------------------------- phantoms


@dataclass(frozen=True)
class Phantom:
    """One rendered image: ``image`` float32 in [0, 1] (bright = dense), and the
    boolean ``lung_mask`` of the two lung fields (including the part behind the heart)."""

    image: np.ndarray
    lung_mask: np.ndarray


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    return y, x


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def _soft_ellipse(y, x, cy, cx, ry, rx, edge=0.05, p=2.0) -> np.ndarray:
    d = (np.abs((x - cx) / rx) ** p + np.abs((y - cy) / ry) ** p) ** (1.0 / p)
    return _sigmoid((1.0 - d) / edge).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Band-limited noise (about ``cells`` blobs across), roughly unit scale."""
    ch = max(2, int(round(cells * h / max(h, w)))) + 1
    cw = max(2, int(round(cells * w / max(h, w)))) + 1
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _segment_distance(y, x, y0, x0, y1, x1) -> np.ndarray:
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((y - y0) * vy + (x - x0) * vx) / (vy * vy + vx * vx), 0.0, 1.0)
    return np.sqrt((y - (y0 + t * vy)) ** 2 + (x - (x0 + t * vx)) ** 2)


def _phantom(label: str, rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy + class finding, no scanner effects. Returns (image in [0,1], lung mask)."""
    y, x = _grid(h, w)
    s = rng.uniform(0.92, 1.08)
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    cy = 0.47 + rng.uniform(-0.03, 0.03)
    img = np.full((h, w), rng.uniform(0.02, 0.08), dtype=np.float32)

    # Body outline (soft tissue), boxy and extending below the image.
    img += _soft_ellipse(y, x, cy + 0.17, cx, 0.62, 0.43 * s, edge=0.04, p=3.0) * rng.uniform(0.38, 0.48)

    # Lung fields: darker, narrower at the apex.
    sep = 0.17 * s + rng.uniform(-0.01, 0.01)
    lry = 0.29 * s * rng.uniform(0.93, 1.07)
    lrx = 0.135 * s * rng.uniform(0.9, 1.1)
    t = np.clip((y - (cy - lry)) / (1.2 * lry), 0.0, 1.0)
    rx_y = lrx * (0.55 + 0.45 * np.sqrt(t))  # (h, 1)
    fields = {}
    for side in (-1, 1):
        lcx = cx + side * sep
        d = np.sqrt(((x - lcx) / rx_y) ** 2 + ((y - cy) / lry) ** 2)
        fields[side] = _sigmoid((1.0 - d) / 0.06).astype(np.float32)
    lungs = np.maximum(fields[-1], fields[1])
    img -= lungs * rng.uniform(0.22, 0.3)

    # Normal lung texture (vessels) and hila, the same for every class.
    img += lungs * 0.025 * rng.uniform(0.5, 1.5) * _smooth_noise(rng, h, w, 10)
    for side in (-1, 1):
        hx = cx + side * (sep - 0.6 * lrx)
        img += 0.06 * rng.uniform(0.6, 1.4) * np.exp(-((x - hx) ** 2 + (y - cy - 0.02) ** 2) / (2 * 0.045**2))

    # Mediastinum, heart shadow and spine.
    med = _sigmoid((0.055 * s - np.abs(x - cx)) / 0.01) * _sigmoid((cy + 0.22 - y) / 0.02)
    img += med * rng.uniform(0.12, 0.17)
    heart = _soft_ellipse(
        y, x, cy + 0.15, cx + 0.06 * s, 0.11 * s * rng.uniform(0.9, 1.15), 0.13 * s * rng.uniform(0.9, 1.2), edge=0.1
    )
    img += heart * rng.uniform(0.12, 0.18)
    spine = _sigmoid((0.03 * s - np.abs(x - cx)) / 0.006)
    img += spine * (0.08 + 0.04 * np.cos(2 * np.pi * 13 * y + rng.uniform(0, 2 * np.pi)))

    # Ribs: periodic bright arcs, convex upwards.
    u = np.abs(x - cx)
    ys = y + 1.3 * (u - 0.2) ** 2
    dy = 2 * lry / 9 * rng.uniform(0.95, 1.05)
    r = (ys - (cy - lry - 0.01)) / dy
    frac = r - np.round(r)
    ribs = np.exp(-((frac * dy / (0.014 * s)) ** 2)) * ((r > -0.5) & (r < 9.5))
    ribs *= _sigmoid((0.42 * s - u) / 0.02) * (u > 0.03)
    img += ribs * rng.uniform(0.04, 0.08)

    # Clavicles (optional).
    if rng.random() < 0.75:
        for side in (-1, 1):
            dist = _segment_distance(y, x, 0.2, cx + side * 0.04, 0.13 + rng.uniform(-0.02, 0.02), cx + side * 0.28)
            img += 0.1 * _sigmoid((0.012 - dist) / 0.004)

    # Breast / soft-tissue shadows: a class-independent confounder over the lower zones.
    if rng.random() < 0.3:
        for side in (-1, 1):
            img += 0.05 * _soft_ellipse(y, x, cy + 0.22, cx + side * 0.2, 0.1, 0.14, edge=0.15)

    img += _finding(label, rng, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs)
    mask = lungs > 0.5
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask


def _finding(label, rng, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs) -> np.ndarray:
    sev = rng.uniform(0.25, 1.0)  # severity: weak findings keep the task non-trivial
    return _FINDINGS[label](rng, sev, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs)


def _find_normal(rng, sev, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs):
    return np.zeros((h, w), dtype=np.float32)


def _find_bacterial(rng, sev, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs):
    side = -1 if rng.random() < 0.5 else 1
    by = cy + lry * rng.uniform(-0.1, 0.55)
    bx = cx + side * (sep + lrx * rng.uniform(-0.2, 0.45))  # mostly lateral of the heart
    sx, sy = rng.uniform(0.04, 0.085, size=2)
    g = np.exp(-(((x - bx) / sx) ** 2 + ((y - by) / sy) ** 2) / 2)
    g = g * (0.6 + 0.4 * _smooth_noise(rng, h, w, 12))
    dense = np.clip(1.5 * g, 0.0, 1.0)
    return (0.34 * sev * dense * fields[side]).astype(np.float32)


def _find_viral(rng, sev, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs):
    n = _smooth_noise(rng, h, w, 30)
    reticular = np.clip(1.0 - np.abs(n) / 0.45, 0.0, 1.0)  # network of lines at zero crossings
    perihilar = 0.7 + 0.3 * np.exp(-((np.abs(x - cx) - 0.6 * sep) ** 2) / (2 * 0.1**2))
    haze = (0.55 + 0.45 * reticular) * perihilar
    return (0.15 * sev * haze * lungs).astype(np.float32)


def _find_covid(rng, sev, y, x, h, w, cx, cy, sep, lrx, lry, rx_y, fields, lungs):
    out = np.zeros((h, w), dtype=np.float32)
    lower = np.clip((y - (cy - 0.3 * lry)) / (0.8 * lry), 0.0, 1.0)
    for side in (-1, 1):
        lateral = np.clip(side * (x - (cx + side * sep)) / rx_y, -1.0, 1.0)  # 1 at the outer edge
        peripheral = np.clip((lateral + 0.3) / 1.1, 0.0, 1.0) ** 1.5
        patches = np.clip(0.55 + 0.6 * _smooth_noise(rng, h, w, 7), 0.0, 1.0)
        out += peripheral * lower * patches * fields[side]
    return (0.38 * sev * out).astype(np.float32)


_FINDINGS = {
    "normal": _find_normal,
    "bacterial": _find_bacterial,
    "viral": _find_viral,
    "covid": _find_covid,
}

_MARKS = ("L", "R", "PORTABLE", "AP", "PA SUPINE", "ERECT")


def _scanner(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Acquisition variation: blur, exposure gradient, contrast, gamma, noise, text."""
    h, w = img.shape
    y, x = _grid(h, w)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    angle = rng.uniform(0, 2 * np.pi)
    img = img + rng.uniform(0.0, 0.18) * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    contrast, offset = rng.uniform(0.5, 1.35), rng.uniform(-0.15, 0.15)
    img = np.clip((img - 0.4) * contrast + 0.4 + offset, 0.0, 1.0)
    img = img ** np.float32(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    img = img + rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(0.0, 0.05))
    if rng.random() < 0.2:
        amount = rng.uniform(0.002, 0.02)
        hit = rng.random((h, w), dtype=np.float32) < amount
        img = np.where(hit, (rng.random((h, w), dtype=np.float32) < 0.5).astype(np.float32), img)
    if rng.random() < 0.6:
        marks = np.zeros((h, w), dtype=np.uint8)
        scale = min(h, w) / 260 * rng.uniform(0.8, 1.3)
        thick = 1 if rng.random() < 0.7 else 2
        side = "L" if rng.random() < 0.5 else "R"
        cv2.putText(marks, side, (int(w * rng.uniform(0.03, 0.15)), int(h * rng.uniform(0.1, 0.2))),
                    cv2.FONT_HERSHEY_SIMPLEX, 2 * scale, 255, thick, cv2.LINE_AA)
        if rng.random() < 0.6:
            text = _MARKS[int(rng.integers(2, len(_MARKS)))]
            cv2.putText(marks, text, (int(w * 0.5), int(h * 0.08)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick,
                        cv2.LINE_AA)
        if rng.random() < 0.5:
            date = f"{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}/{int(rng.integers(2012, 2021))}"
            cv2.putText(marks, date, (int(w * 0.04), int(h * 0.96)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick,
                        cv2.LINE_AA)
        m = marks.astype(np.float32) / 255.0
        img = img * (1 - m) + np.float32(rng.uniform(0.85, 1.0)) * m
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_phantom(
    label: str,
    seed: int | np.random.Generator = 0,
    shape: tuple[int, int] = (128, 128),
    scanner: bool = False,
) -> Phantom:
    """Render one SYNTHETIC phantom of class ``label`` at a fixed ``shape`` (h, w).

    With ``scanner=False`` (default) no acquisition variation is applied, which
    makes class findings directly measurable (e.g. mean intensity in ``lung_mask``).
    """
    if label not in _FINDINGS:
        raise ConfigError(f"unknown synthetic class {label!r}; valid classes: {', '.join(CLASSES)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    h, w = int(shape[0]), int(shape[1])
    img, mask = _phantom(label, rng, h, w)
    if scanner:
        img = _scanner(img, rng)
    return Phantom(img, mask)


# ----------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class _Sample:
    pixels: np.ndarray  # float32 (h, w) or (h, w, 3), in [0, 1]
    depth: str  # "gray8" | "gray16" | "gray12" | "rgb8"
    quality: int  # JPEG quality
    ext_u: float  # uniform draw used by layouts that pick among extensions


def _render_sample(img: _Image, seed: int, size_range: tuple[int, int]) -> _Sample:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, img.index)))
    lo, hi = size_range
    h = int(rng.integers(lo, hi + 1))
    w = int(np.clip(round(h * rng.uniform(0.8, 1.25)), lo, hi))
    pixels, _ = _phantom(img.label, rng, h, w)
    pixels = _scanner(pixels, rng)
    u = rng.random()
    if u < 0.65:
        depth = "gray8"
    elif u < 0.82:
        depth = "gray16" if rng.random() < 0.5 else "gray12"
    else:
        depth = "rgb8"
        tint = (1.0 + rng.uniform(-0.05, 0.05, size=3)).astype(np.float32)
        pixels = np.clip(pixels[:, :, None] * tint, 0.0, 1.0)
    return _Sample(pixels, depth, int(rng.integers(72, 97)), float(rng.random()))


def _encode(sample: _Sample, ext: str) -> bytes:
    depth = sample.depth
    if ext != ".png" and depth in ("gray16", "gray12"):
        depth = "gray8"  # JPEG holds 8 bits only
    if depth == "gray16":
        arr = np.round(sample.pixels * 65535).astype(np.uint16)
    elif depth == "gray12":
        arr = np.round(sample.pixels * 4095).astype(np.uint16)
    else:
        arr = np.round(sample.pixels * 255).astype(np.uint8)
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, sample.quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:  # pragma: no cover - OpenCV failure
        raise RuntimeError(f"internal: OpenCV could not encode a {depth} image as {ext}")
    return buf.tobytes()


class _Writer:
    """Renders plan images and writes them; shared by the layouts."""

    def __init__(self, out: Path, seed: int, size_range: tuple[int, int]) -> None:
        self.out, self.seed, self.size_range = out, seed, size_range

    def sample(self, img: _Image) -> _Sample:
        return _render_sample(img, self.seed, self.size_range)

    def write(self, rel: Path, sample: _Sample) -> None:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(sample, path.suffix))


# ------------------------------------------------------------------------ naming


def _kermany_style_names(
    patients: list[_Patient], images: list[_Image], seed: int, merge_persons: bool
) -> tuple[dict[int, str], int]:
    """Base file names (no extension) in the Kermany/CoronaHack style.

    Returns (image index -> name, number of distinct patient identities)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    pneu = [i for i, p in enumerate(patients) if p.label in ("bacterial", "viral", "covid")]
    normal = [i for i, p in enumerate(patients) if p.label == "normal"]
    pid = {i: int(v) + 1 for i, v in zip(pneu, rng.permutation(len(pneu)))}
    norm_id = {i: int(v) + 1 for i, v in zip(normal, rng.permutation(len(normal)))}
    normal2 = {i: bool(rng.random() < 0.3) for i in normal}
    if merge_persons:  # like the real data: some persons have bacteria AND virus images
        merged_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
        for split in ("train", "val", "test"):
            bac = [i for i in pneu if patients[i].label == "bacterial" and patients[i].split == split]
            vir = [i for i in pneu if patients[i].label in ("viral", "covid") and patients[i].split == split]
            k = min(len(bac), int(round(0.12 * len(vir))))
            if k == 0:
                continue
            hosts = merged_rng.choice(len(bac), size=k, replace=False)
            guests = merged_rng.choice(len(vir), size=k, replace=False)
            for hi, gi in zip(hosts, guests):
                pid[vir[gi]] = pid[bac[hi]]
    names: dict[int, str] = {}
    counters = Counter()
    ordered = sorted(images, key=lambda im: (pid.get(im.patient, 0), im.patient, im.k))
    for im in ordered:
        p = im.patient
        if im.label == "normal":
            prefix = "NORMAL2-" if normal2[p] else ""
            suffix = "" if im.k == 0 else f"-{im.k + 1:04d}"
            names[im.index] = f"{prefix}IM-{norm_id[p]:04d}-0001{suffix}"
        else:
            kind = "bacteria" if im.label == "bacterial" else "virus"
            counters[kind] += 1
            names[im.index] = f"person{pid[p]}_{kind}_{counters[kind]}"
    n_ids = len(set(pid.values())) + len(normal)
    return names, n_ids


def _tally(rows: list[tuple[str, str]]) -> dict:
    """rows: (split or "", class) per written image -> count summaries."""
    classes = Counter(c for _, c in rows)
    splits = Counter(s for s, _ in rows if s)
    by_split: dict[str, dict[str, int]] = {}
    for s, c in rows:
        if s:
            by_split.setdefault(s, Counter())[c] += 1
    return {
        "classes": dict(sorted(classes.items())),
        "splits": dict(sorted(splits.items())),
        "by_split": {s: dict(sorted(v.items())) for s, v in sorted(by_split.items())},
    }


# ----------------------------------------------------------------------- layouts


@LAYOUTS.register("coronahack")
def _write_coronahack(writer: _Writer, patients: list[_Patient], images: list[_Image]) -> dict:
    """CoronaHack: metadata CSV (written last) + flat train/test image folders."""
    names, n_ids = _kermany_style_names(patients, images, writer.seed, merge_persons=False)
    covid_case = {}
    for im in images:
        if im.label == "covid":
            covid_case.setdefault(im.patient, len(covid_case) + 1)
    base = Path(*CORONAHACK_DIR)
    for split in ("train", "test"):
        (writer.out / base / split).mkdir(parents=True, exist_ok=True)
    meta = {
        "normal": ("Normal", "", ""),
        "bacterial": ("Pnemonia", "", "bacteria"),  # sic: the real file's spelling
        "viral": ("Pnemonia", "", "Virus"),
        "covid": ("Pnemonia", "COVID-19", "Virus"),
    }
    rows: list[tuple[str, str, str, str, str]] = []
    tally: list[tuple[str, str]] = []
    for im in images:
        sample = writer.sample(im)
        split = "test" if im.split == "test" else "train"  # Kermany's val went into TRAIN
        if sample.depth in ("gray16", "gray12"):
            ext = ".png"
        elif im.label == "covid":
            ext = ".jpg" if sample.ext_u < 0.6 else ".png"
        else:
            ext = ".jpeg"
        stem = f"covid19-case{covid_case[im.patient]:03d}-fig{im.k + 1}" if im.label == "covid" else names[im.index]
        writer.write(base / split / f"{stem}{ext}", sample)
        label, l2, l1 = meta[im.label]
        rows.append((f"{stem}{ext}", label, split.upper(), l2, l1))
        tally.append((split, im.label))
    rows.sort(key=lambda r: r[2] != "TRAIN")  # TRAIN rows first, like the real file
    with replacing_file(writer.out / CORONAHACK_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CORONAHACK_COLUMNS)
        for i, row in enumerate(rows):
            w.writerow((i, *row))
    return {**_tally(tally), "n_patients": n_ids}


@LAYOUTS.register("kermany")
def _write_kermany(writer: _Writer, patients: list[_Patient], images: list[_Image]) -> dict:
    """Kermany: chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}, all .jpeg; covid -> virus."""
    names, n_ids = _kermany_style_names(patients, images, writer.seed, merge_persons=True)
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (writer.out / KERMANY_DIR / split / cls).mkdir(parents=True, exist_ok=True)
    tally = []
    for im in images:
        folder = "NORMAL" if im.label == "normal" else "PNEUMONIA"
        writer.write(Path(KERMANY_DIR, im.split, folder, f"{names[im.index]}.jpeg"), writer.sample(im))
        tally.append((im.split, "viral" if im.label == "covid" else im.label))
    return {**_tally(tally), "n_patients": n_ids}


@LAYOUTS.register("imagefolder")
def _write_imagefolder(writer: _Writer, patients: list[_Patient], images: list[_Image]) -> dict:
    """One folder per class, PNG files (8-bit, 16-bit or 3-channel)."""
    for cls in CLASSES:
        (writer.out / cls).mkdir(parents=True, exist_ok=True)
    tally = []
    for im in images:
        writer.write(Path(im.label, f"patient{im.patient + 1:04d}_img{im.k + 1}.png"), writer.sample(im))
        tally.append(("", im.label))
    return {**_tally(tally), "splits": {}, "by_split": {}, "n_patients": len(patients)}


# --------------------------------------------------------------------------- API


def _check_args(n: object, seed: object, size_range: object) -> tuple[int, int, tuple[int, int]]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"synthetic data: n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic data: seed must be a non-negative integer, got {seed!r}")
    try:
        lo, hi = (int(v) for v in size_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"synthetic data: size_range must be two integers (min, max), got {size_range!r}") from None
    if not 32 <= lo <= hi <= 4096:
        raise ConfigError(f"synthetic data: size_range must satisfy 32 <= min <= max <= 4096, got {size_range!r}")
    return int(n), int(seed), (lo, hi)


def _existing_entries(out: Path) -> list[str]:
    return [name for name in _DATASET_ENTRIES if (out / name).exists()]


def write_synthetic(
    out: Path,
    n: int = 600,
    layout: str = "coronahack",
    seed: int = 0,
    size_range: tuple[int, int] = (96, 192),
    *,
    overwrite: bool = False,
) -> dict:
    """Write ``n`` SYNTHETIC (not medical) chest X-ray phantoms into ``out`` in ``layout``.

    Returns a summary: layout, root, n, seed, n_patients, classes (count per class
    as the layout labels them), splits (count per split) and by_split.
    Raises DataError if ``out`` already holds a dataset, unless ``overwrite=True``
    (which deletes the previous dataset's entries first). The metadata CSV
    (coronahack) and the marker file ``.cxrtune-synthetic.json`` are written last.
    """
    write_layout = LAYOUTS.get(layout, where="write_synthetic(layout=...)")
    n, seed, size_range = _check_args(n, seed, size_range)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"synthetic data: output path {out} exists and is not a folder; choose a folder path")
    found = _existing_entries(out) if out.exists() else []
    if found and not overwrite:
        raise DataError(
            f"synthetic data: {out} already contains a dataset ({', '.join(found)}); "
            "choose an empty folder, or replace it: pass --overwrite to `cxrtune data synth` "
            "(overwrite=True from Python)"
        )
    for name in found:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    patients, images = _make_plan(n, seed)
    result = write_layout(_Writer(out, seed, size_range), patients, images)
    summary = {
        "layout": layout,
        "root": str(out),
        "n": n,
        "seed": seed,
        "n_patients": result["n_patients"],
        "classes": result["classes"],
        "splits": result["splits"],
        "by_split": result["by_split"],
    }
    marker = {
        "generator": "cxrtune.data.synthetic",
        "note": "SYNTHETIC phantoms, not medical images",
        "version": SYNTHETIC_VERSION,
        "layout": layout,
        "n": n,
        "seed": seed,
        "size_range": list(size_range),
        "classes": summary["classes"],
        "splits": summary["splits"],
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def read_marker(root: Path) -> dict | None:
    """The synthetic-dataset marker in ``root``, or None if absent/unreadable."""
    try:
        data = json.loads((Path(root) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, n: int, seed: int) -> bool:
    m = read_marker(root)
    return (
        m is not None
        and m.get("version") == SYNTHETIC_VERSION
        and m.get("layout") == "coronahack"
        and m.get("n") == n
        and m.get("seed") == seed
        and (root / CORONAHACK_CSV).is_file()
    )


def ensure_synthetic(root: Path, n: int = 600, seed: int = 0) -> Path:
    """Return ``root`` holding a complete coronahack-layout SYNTHETIC dataset.

    Reuses it when the marker matches (n, seed, layout, version); otherwise
    generates into a temporary sibling folder and renames it into place, so an
    interrupted run never leaves a half dataset that a later run would trust.
    A non-empty ``root`` that is not a synthetic dataset is never touched (DataError).
    """
    root = Path(root)
    n, seed, _ = _check_args(n, seed, (96, 192))
    if _is_complete(root, n, seed):
        return root
    if root.exists():
        if not root.is_dir():
            raise DataError(f"synthetic data: {root} exists and is not a folder; choose another data root")
        if read_marker(root) is None and any(root.iterdir()):
            raise DataError(
                f"synthetic data: {root} is not empty and is not a cxrtune synthetic dataset "
                f"(no {MARKER_NAME}); refusing to replace it. Choose another folder or empty it"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write_synthetic(tmp, n=n, layout="coronahack", seed=seed)
        if root.exists() and any(root.iterdir()):  # a stale synthetic dataset (other n/seed/version)
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(root, old)
            except FileNotFoundError:  # another process moved it meanwhile
                old = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if _is_complete(root, n, seed):  # a concurrent run finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated SYNTHETIC chest X-ray data (%d phantoms, seed %d, not medical images) at %s", n, seed, root)
    return root
