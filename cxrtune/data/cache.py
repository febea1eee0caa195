"""Decode every image once into one memory-mapped uint8 array (N, size, size).

Decoding multi-megapixel JPEGs every epoch of every trial is where naive
pipelines lose their time, so the first run decodes each image once
(``load_gray`` + ``to_square``) into ``<cache_root>/<fingerprint>/images.npy``
and every later trial, on any worker, maps that file read-only.

Layout of a cache directory::

    images.npy   uint8 (n, size, size), row i is meta["paths"][i]
    meta.json    written last: fingerprint, size, n, paths, skipped, created, format

A build writes into ``.tmp-<fingerprint>-<pid>/`` and renames it into place,
so a failed or interrupted build never leaves a directory a later run would
trust. Changed files (size or mtime) give a new fingerprint and a new cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..atomic import replacing_file
from ..errors import ConfigError, DataError
from .decode import ALPHA_DROPPED, load_gray_noted, to_square

__all__ = ["BadImage", "ImageCache", "ON_BAD_IMAGE", "build_cache", "existing_cache", "fingerprint"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the decode or the layout changes: old caches are then ignored
ON_BAD_IMAGE = ("error", "skip")
ARRAY_FILE = "images.npy"
META_FILE = "meta.json"
_SHOW_BAD = 5  # bad files named in a message; the rest are counted
UPSCALED = "upscaled"  # note: the image's short edge is below the cache size


@dataclass(frozen=True)
class BadImage:
    """An image that could not be decoded, and why."""

    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class ImageCache:
    """A built cache: memory-mapped uint8 images (N, size, size) and the paths they came from.

    ``paths`` are absolute (``Path.absolute()``, symlinks kept), in the order
    given to :func:`build_cache` minus the skipped ones. Pickling an
    ImageCache (e.g. to a Ray worker) sends only its directory, which the
    receiver maps again instead of copying the pixels.
    """

    fingerprint: str
    size: int
    directory: Path
    paths: tuple[str, ...]  # the images kept, in array order
    skipped: tuple[BadImage, ...]  # images skipped under on_bad_image="skip"
    images: np.ndarray  # np.load(..., mmap_mode="r")

    def __len__(self) -> int:
        return len(self.paths)

    def index(self) -> dict[str, int]:
        """Path -> row in ``images`` (the first row, should a path be listed twice)."""
        rows: dict[str, int] = {}
        for i, p in enumerate(self.paths):
            rows.setdefault(p, i)
        return rows

    def __reduce__(self):
        return (type(self).open, (self.directory,))

    @classmethod
    def open(cls, directory: Path | str) -> "ImageCache":
        """Load a built cache directory, verifying its meta.json against the array."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            size, n = int(meta["size"]), int(meta["n"])
            paths = tuple(str(p) for p in meta["paths"])
            skipped = tuple(BadImage(str(b["path"]), str(b["reason"])) for b in meta["skipped"])
            fp, version = str(meta["fingerprint"]), int(meta["format_version"])
            images = np.load(directory / ARRAY_FILE, mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, truncated, garbled
            raise _corrupt(directory, f"{type(e).__name__}: {e}") from None
        problem = _mismatch(images, n, size, len(paths), version)
        if problem:
            raise _corrupt(directory, problem)
        return cls(fp, size, directory, paths, skipped, images)


def fingerprint(paths: Sequence[Path | str], size: int) -> str:
    """A short hex digest of (format version, size, each path's absolute name, byte size and mtime).

    Any rewritten or touched file changes it, so a stale cache is never
    reused; order matters because rows follow the given order. A missing
    file hashes as missing (the build then reports it as a bad image).
    """
    h = hashlib.sha256(f"cxrtune-image-cache v{FORMAT_VERSION} size={int(size)}\n".encode())
    for p in paths:
        name = str(Path(p).absolute())
        try:
            st = os.stat(name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0missing\n".encode())
    return h.hexdigest()[:20]


def build_cache(
    paths: Sequence[Path | str],
    size: int,
    cache_root: Path | str,
    *,
    on_bad_image: str = "error",
    workers: int = 0,
    progress: bool = True,
) -> ImageCache:
    """Return the cache of ``paths`` at ``size`` px, decoding only if no valid one exists.

    ``on_bad_image``: "error" raises a DataError listing every undecodable
    file (after trying them all); "skip" leaves them out and lists them in
    ``ImageCache.skipped``. ``workers``: decoding processes (0 = all cores,
    1 = in this process).
    """
    _check_args(size, on_bad_image, workers)
    if not paths:
        raise DataError("no images to cache: the image list is empty")
    cache_root = Path(cache_root)
    fp = fingerprint(paths, size)
    final = cache_root / fp
    cache = _open_valid(final, fp)
    if cache is not None:
        log.info("cache hit: %d images of %d px at %s", len(cache), size, final)
    else:
        cache = _build(list(paths), size, cache_root, fp, on_bad_image, workers, progress)
    _check_bad(cache, len(paths), on_bad_image)
    return cache


def existing_cache(paths: Sequence[Path | str], size: int, cache_root: Path | str) -> ImageCache | None:
    """The valid cache of ``paths`` at ``size`` px if one was built, else None; builds,
    removes and logs nothing (for `data inspect`, which must not build one as a side effect)."""
    directory = Path(cache_root) / fingerprint(paths, size)
    try:
        cache = ImageCache.open(directory)
    except DataError:
        return None
    return cache if cache.fingerprint == directory.name else None


# --------------------------------------------------------------------------- checks


def _check_args(size: int, on_bad_image: str, workers: int) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(
            f"data.on_bad_image: unknown value {on_bad_image!r}; valid values: {', '.join(ON_BAD_IMAGE)}"
        )
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"data.image_size must be a positive integer, got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ConfigError(f"data.workers must be 0 (all cores) or a positive integer, got {workers!r}")


def _check_bad(cache: ImageCache, n_given: int, on_bad_image: str) -> None:
    """Under "error", any skipped image fails the build (also on a hit of a cache built with "skip")."""
    if not cache.skipped:
        return
    if on_bad_image == "error":
        raise _bad_images_error(cache.skipped, n_given)
    log.warning("skipped %s", _bad_list(cache.skipped, n_given))


def _bad_images_error(bad: Sequence[BadImage], n_given: int) -> DataError:
    return DataError(_bad_list(bad, n_given) + "\nfix: repair or remove them, or leave them out: pass "
                     "--on-bad-image skip (or set data.on_bad_image: skip)")


def _bad_list(bad: Sequence[BadImage], n_given: int) -> str:
    lines = [f"{len(bad)} of {n_given} image(s) cannot be decoded:"]
    lines += [f"  {b.path}: {b.reason}" for b in bad[:_SHOW_BAD]]
    if len(bad) > _SHOW_BAD:
        lines.append(f"  ... and {len(bad) - _SHOW_BAD} more")
    return "\n".join(lines)


def _mismatch(images: np.ndarray, n: int, size: int, n_paths: int, version: int) -> str:
    """Why an opened array does not match its meta, or "" when it does."""
    if version != FORMAT_VERSION:
        return f"format version {version}, expected {FORMAT_VERSION}"
    if images.dtype != np.uint8:
        return f"array dtype {images.dtype}, expected uint8"
    if images.shape != (n, size, size) or n_paths != n:
        return f"array shape {images.shape}, meta says {n_paths} paths of ({n}, {size}, {size})"
    return ""


def _corrupt(directory: Path, why: str) -> DataError:
    return DataError(f"cache at {directory} is incomplete or corrupt ({why}); delete it and rebuild")


def _open_valid(directory: Path, fp: str) -> ImageCache | None:
    """The cache at ``directory`` if it is complete and is the one ``fp`` names; a bad one is removed."""
    if not directory.exists():
        return None
    try:
        cache = ImageCache.open(directory)
        if cache.fingerprint == fp:
            return cache
        why = f"meta fingerprint {cache.fingerprint} != {fp}"
    except DataError as e:
        why = str(e)
    log.warning("ignoring and rebuilding a bad image cache: %s", why)
    _remove_aside(directory)
    return None


def _remove_aside(directory: Path) -> None:
    """Rename first (atomic), so that no other process opens a half-deleted directory."""
    trash = directory.with_name(f".bad-{directory.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(directory, trash)
    except FileNotFoundError:  # someone else removed it already
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- build


def _build(paths: list[Path | str], size: int, cache_root: Path, fp: str,
           on_bad_image: str, workers: int, progress: bool) -> ImageCache:
    """Decode into a temporary directory, then rename it into place; the temp dir never survives."""
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{fp}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed build by a process with our pid
    tmp.mkdir()
    abs_paths = [str(Path(p).absolute()) for p in paths]
    log.info("building image cache: %d images at %d px -> %s", len(paths), size, cache_root / fp)
    try:
        kept, bad = _decode_all(abs_paths, size, tmp / ARRAY_FILE, workers, progress)
        if not kept:
            raise DataError(_bad_list(bad, len(paths)) + "\nnone of the images could be decoded")
        if bad and on_bad_image == "error":
            raise _bad_images_error(bad, len(paths))  # after decoding all, so it lists them all
        _write_meta(tmp, fp, size, kept, bad)
        return _publish(tmp, cache_root / fp, fp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode_all(paths: list[str], size: int, array_path: Path, workers: int,
                progress: bool) -> tuple[list[str], list[BadImage]]:
    """Decode ``paths`` in order into ``array_path``; kept rows are packed, bad ones listed."""
    n = len(paths)
    images = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(n, size, size))
    kept: list[str] = []
    bad: list[BadImage] = []
    noted: dict[str, list[str]] = {}  # note -> paths
    start = time.perf_counter()
    try:
        with _progress_bar(n, progress) as bar, closing(_decoded(paths, size, workers)) as results:
            for path, (img, reason, notes) in zip(paths, results):
                if img is None:
                    bad.append(BadImage(path, reason))
                else:
                    images[len(kept)] = img  # kept rows stay packed: row i of the cache is kept[i]
                    kept.append(path)
                for note in notes:
                    noted.setdefault(note, []).append(path)
                bar.update(1)
        images.flush()
    finally:
        del images  # unmap before the file is shrunk or removed
    secs = time.perf_counter() - start
    log.info("decoded %d images in %.1f s (%.0f images/s)", n, secs, n / max(secs, 1e-9))
    _log_notes(noted, n, size)
    if bad and kept:
        _shrink_rows(array_path, len(kept), size)
    return kept, bad


def _log_notes(noted: dict[str, list[str]], n: int, size: int) -> None:
    """Once per build, with a count and an example: silent defaults the user should know of."""
    up = noted.get(UPSCALED, [])
    if up:
        log.warning("%d of %d images are smaller than %d px on their short edge and were "
                    "upscaled (blurrier than the rest; e.g. %s); consider a smaller --image-size "
                    "(data.image_size) or removing them", len(up), n, size, up[0])
    alpha = noted.get(ALPHA_DROPPED, [])
    if alpha:
        log.info("note: %d of %d images have an alpha (transparency) channel; it was dropped and "
                 "the colour under it kept (e.g. %s)", len(alpha), n, alpha[0])


def _decoded(paths: list[str], size: int, workers: int) -> Iterator[tuple[np.ndarray | None, str, tuple[str, ...]]]:
    """(image, "", notes) or (None, reason, ()) for each path, in order."""
    n_workers = min(workers or os.cpu_count() or 1, len(paths))
    if n_workers <= 1:
        yield from map(_decode_one, paths, [size] * len(paths))
        return
    # "spawn": forking a parent that already runs threads (torch, Ray, OpenCV)
    # can deadlock the children; the import cost is paid once per build.
    pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        chunk = max(1, min(32, len(paths) // (n_workers * 8)))
        yield from pool.map(_decode_one, paths, [size] * len(paths), chunksize=chunk)
    finally:
        # On failure do not wait for the queued chunks: only the running ones finish.
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker() -> None:
    """One OpenCV thread per worker process: the pool already uses every core."""
    import cv2

    cv2.setNumThreads(1)


def _decode_one(path: str, size: int) -> tuple[np.ndarray | None, str, tuple[str, ...]]:
    """Decode and square one image; a bad file is a reason, not an exception. Notes say
    what was silently changed (alpha dropped, upscaled), for one summary per build."""
    try:
        img, notes = load_gray_noted(path)
    except DataError as e:
        return None, getattr(e, "reason", str(e)), ()
    if min(img.shape) < size:
        notes += (UPSCALED,)
    return to_square(img, size), "", notes


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    show = enabled and sys.stderr is not None and sys.stderr.isatty()
    return tqdm(total=total, desc="caching images", unit="img", disable=not show)


def _shrink_rows(array_path: Path, n_rows: int, size: int) -> None:
    """Make the .npy hold only its first ``n_rows`` rows (after bad images were left out).

    Rewriting the header in place and truncating avoids copying the array;
    NumPy pads headers so that the shape may shrink or grow without changing
    the header length. Should the length differ anyway, copy the rows.
    """
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                 "fortran_order": False, "shape": (n_rows, size, size)})
    with open(array_path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
        if len(header.getvalue()) == offset:
            f.seek(0)
            f.write(header.getvalue())
            f.truncate(offset + n_rows * size * size)
            return
    _copy_rows(array_path, n_rows, size)


def _copy_rows(array_path: Path, n_rows: int, size: int) -> None:
    src = np.load(array_path, mmap_mode="r")
    with replacing_file(array_path) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n_rows, size, size))
        for start in range(0, n_rows, 1024):  # in blocks: the array may not fit in memory
            stop = min(start + 1024, n_rows)
            dst[start:stop] = src[start:stop]
        dst.flush()
        del src, dst


def _write_meta(directory: Path, fp: str, size: int, kept: list[str], bad: list[BadImage]) -> None:
    """Written last: its presence marks the array as complete."""
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "size": size,
        "n": len(kept),
        "created": time.time(),
        "created_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paths": kept,
        "skipped": [{"path": b.path, "reason": b.reason} for b in bad],
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))


def _publish(tmp: Path, final: Path, fp: str) -> ImageCache:
    """Rename ``tmp`` to ``final``; if another process got there first with a valid cache, use theirs."""
    for _ in range(2):
        try:
            os.rename(tmp, final)
            return ImageCache.open(final)
        except OSError:
            if not final.exists():
                raise
        theirs = _open_valid(final, fp)  # removes it if it is bad, so the retry can succeed
        if theirs is not None:
            log.info("another process built the same cache first; using %s", final)
            return theirs
    raise DataError(f"cannot publish the image cache at {final}: it keeps being replaced; retry")
