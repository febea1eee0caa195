"""CXR-Norm: the chest X-ray normalisation of the source reports.

``cxrnorm`` = CLAHE -> median filter -> percentile contrast stretch, each step
optional and every parameter searchable. Alternatives: ``histeq_blur`` (global
histogram equalisation, then a 5x5 Gaussian blur) and ``none`` (identity).

All methods map one 2-D uint8 image to one 2-D uint8 image. ``normalized`` runs
a method over a whole image cache and memoises the result by
``(source_key, cfg.key())``: in a small in-process LRU and, when ``memo_dir`` is
given, as ``memo_dir/<source_key>-<cfg.key()>.npy`` (written atomically, loaded
memory-mapped read-only). ``CXRNormConfig`` and the method names live in
``cxrnorm_config.py``, which configs import without OpenCV.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ..atomic import replacing_file
from .cxrnorm_config import METHODS, CXRNormConfig

log = logging.getLogger(__name__)

_LRU_SIZE = 4


# ---------------------------------------------------------------- the steps


def clahe(img: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    # A CLAHE object is not thread-safe; creating one costs microseconds.
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    return op.apply(img)


def median(img: np.ndarray, kernel: int) -> np.ndarray:
    return img if kernel <= 1 else cv2.medianBlur(img, int(kernel))


def _histogram(img: np.ndarray) -> np.ndarray:
    if img.size < 2**24:  # calcHist returns float32 counts: exact below 2**24
        return cv2.calcHist([img], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(img.ravel(), minlength=256)


def percentiles(img: np.ndarray, pcts: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(img, pcts)`` (linear method) computed from the 256-bin histogram."""
    cum = np.cumsum(_histogram(img))
    n = int(cum[-1])
    pos = np.asarray(pcts, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(pos)
    frac = pos - below
    above = np.minimum(below + 1, n - 1)
    # The value at sorted index k is the first grey level whose cumulative count exceeds k.
    v_below = np.searchsorted(cum, below, side="right")
    v_above = np.searchsorted(cum, above, side="right")
    return v_below + frac * (v_above - v_below)


def stretch(img: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Map the low..high percentiles linearly to 0..255 (clipped), via a 256-entry LUT.

    An image whose percentiles are less than one grey level apart (e.g. a flat
    image) is returned unchanged.
    """
    if img.size == 0:
        return img
    lo, hi = percentiles(img, (low_pct, high_pct))
    if hi - lo < 1.0:
        return img
    levels = np.arange(256, dtype=np.float64)
    lut = np.clip(np.rint((levels - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


@METHODS.register("cxrnorm")
def _cxrnorm(img: np.ndarray, cfg: CXRNormConfig) -> np.ndarray:
    out = img
    if cfg.clahe:
        out = clahe(out, cfg.clip_limit, cfg.tile_grid)
    out = median(out, cfg.median_kernel)
    if cfg.stretch:
        out = stretch(out, cfg.low_pct, cfg.high_pct)
    return out


@METHODS.register("histeq_blur")
def _histeq_blur(img: np.ndarray, cfg: CXRNormConfig) -> np.ndarray:
    return cv2.GaussianBlur(cv2.equalizeHist(img), (5, 5), 0)


@METHODS.register("none")
def _none(img: np.ndarray, cfg: CXRNormConfig) -> np.ndarray:
    return img


# ---------------------------------------------------------------- public API


def _check_image(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
        got = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"CXR-Norm expects a 2-D uint8 image, got a {got}")
    return np.ascontiguousarray(img)


def apply(img: np.ndarray, cfg: CXRNormConfig) -> np.ndarray:
    """Normalise one 2-D uint8 image; returns a 2-D uint8 image of the same shape.

    The result may be ``img`` itself when the method leaves it unchanged
    (``none``, a flat image): treat it as read-only.
    """
    cfg.validate()
    return METHODS.get(cfg.method)(_check_image(img), cfg)


def apply_batch(images: np.ndarray, cfg: CXRNormConfig, workers: int = 0) -> np.ndarray:
    """Normalise an (N, H, W) uint8 stack into a new (N, H, W) uint8 array.

    ``workers`` > 1 runs that many threads (OpenCV releases the GIL); 0 or 1 runs
    in the calling thread.
    """
    cfg.validate()
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.dtype != np.uint8:
        got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"CXR-Norm expects an (N, H, W) uint8 image stack, got a {got}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    fn = METHODS.get(cfg.method)
    out = np.empty(images.shape, dtype=np.uint8)
    n = len(images)

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            out[i] = fn(np.ascontiguousarray(images[i]), cfg)

    workers = min(workers, n)
    if workers <= 1:
        run(0, n)
    else:
        # A few chunks per thread: low overhead, still balanced.
        step = max(1, -(-n // (workers * 4)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxrnorm") as pool:
            for f in [pool.submit(run, lo, min(lo + step, n)) for lo in range(0, n, step)]:
                f.result()
    return out


_lru: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_lru_lock = threading.Lock()


def clear_memo_cache() -> None:
    """Empty the in-process LRU of ``normalized`` results (memo files stay)."""
    with _lru_lock:
        _lru.clear()


def memo_path(memo_dir: Path, source_key: str, cfg: CXRNormConfig) -> Path:
    return Path(memo_dir) / f"{source_key}-{cfg.key()}.npy"


def _load_memo(path: Path, images: np.ndarray) -> np.ndarray | None:
    """The memo file mapped read-only, or None when missing or unusable."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        log.warning("CXR-Norm memo %s is unreadable (%s); recomputing", path, e)
        return None
    if not isinstance(arr, np.ndarray) or arr.shape != images.shape or arr.dtype != np.uint8:
        log.warning(
            "CXR-Norm memo %s holds %s %s, expected uint8 %s; recomputing",
            path, getattr(arr, "dtype", "?"), getattr(arr, "shape", "?"), images.shape,
        )
        return None
    return arr


def _save_memo(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` to ``path`` atomically: a reader never sees half an array."""
    with replacing_file(path) as tmp, tmp.open("wb") as f:  # a path would get ".npy" appended
        np.save(f, arr, allow_pickle=False)


def _touch(path: Path) -> None:
    """Mark a memo file used now: eviction goes by modification time (access times are
    not kept on most mounts)."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict_memos(memo_dir: Path, budget_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used memo files of ``memo_dir`` until the rest fit in
    ``budget_bytes`` (``keep``, the one just used, stays). A trial still reading an evicted
    file keeps its mapping (unlinking does not unmap); a later one recomputes it."""
    files = []
    for p in Path(memo_dir).glob("*.npy"):
        try:
            st = p.stat()
        except OSError:  # evicted by another trial meanwhile
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    evicted = []
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= budget_bytes:
            break
        if keep is not None and p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        evicted.append(p)
    if evicted:
        log.info("CXR-Norm memo over its budget of %.1f GB: removed %d least recently used file(s) from %s",
                 budget_bytes / 1e9, len(evicted), memo_dir)
    return evicted


def normalized(
    images: np.ndarray,
    source_key: str,
    cfg: CXRNormConfig,
    memo_dir: Path | None,
    workers: int = 0,
    budget_bytes: int | None = None,
) -> np.ndarray:
    """``apply_batch(images, cfg)``, memoised by ``(source_key, cfg.key())``.

    ``source_key`` is the image cache's fingerprint (it names the memo file, so
    it must not contain path separators). The result is read-only; for an
    identity config (``method="none"``) it is ``images`` itself. With
    ``budget_bytes``, the memo files of ``memo_dir`` are kept within it (LRU).
    """
    cfg.validate()
    if not source_key or "/" in source_key or os.sep in source_key or source_key in (".", ".."):
        raise ValueError(f"source_key must be a non-empty file-name-safe string, got {source_key!r}")
    if cfg.is_identity:
        return images
    key = (source_key, cfg.key())
    with _lru_lock:
        hit = _lru.get(key)
        if hit is not None and hit.shape == images.shape:
            _lru.move_to_end(key)
            return hit

    result: np.ndarray | None = None
    path = memo_path(memo_dir, source_key, cfg) if memo_dir is not None else None
    if path is not None:
        result = _load_memo(path, images)
        if result is not None:
            _touch(path)
    if result is None:
        result = apply_batch(images, cfg, workers=workers)
        if path is not None and budget_bytes != 0:
            _save_memo(path, result)
            # Keep the page-cache-backed map, not a private copy, in the LRU.
            mapped = _load_memo(path, images)
            if mapped is not None:
                result = mapped
    if path is not None and budget_bytes is not None:
        evict_memos(path.parent, budget_bytes, keep=path)
    if result.flags.writeable:
        result.flags.writeable = False

    with _lru_lock:
        _lru[key] = result
        _lru.move_to_end(key)
        while len(_lru) > _LRU_SIZE:
            _lru.popitem(last=False)
    return result
