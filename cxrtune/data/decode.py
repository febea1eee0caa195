"""Decode one image file (PNG, JPEG, TIFF, ..., DICOM), or its bytes, to a 2-D uint8
grayscale array.

Every decoder problem (empty, truncated, not an image, unsupported DICOM
compression) becomes an :class:`ImageDecodeError` naming the file and the
reason, so the cache build can list every bad file at once.

Why Pillow rather than OpenCV for raster files: both decode JPEG with
libjpeg-turbo at the same speed, but OpenCV silently returns a partly grey image
for a truncated JPEG and ignores EXIF orientation under IMREAD_UNCHANGED, whereas
Pillow raises on truncation (``ImageFile.LOAD_TRUNCATED_IMAGES`` is False by
default, and this module never changes it) and ``ImageOps.exif_transpose``
honours every orientation. JPEG colour images are decoded straight to luma by
libjpeg (``Image.draft("L", ...)`` at full scale), which skips the colour
conversion and is faster than decoding RGB and converting.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

__all__ = ["ImageDecodeError", "load_gray", "load_gray_bytes", "load_gray_noted", "to_square", "window_to_uint8",
           "DICOM_SUFFIXES", "ALPHA_DROPPED"]

DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128  # "DICM" follows a 128-byte preamble in a Part 10 file

# Note returned by load_gray_noted when a transparency channel was discarded.
ALPHA_DROPPED = "alpha dropped"
# Pillow modes with an alpha channel.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# Pillow modes holding more than 8 bits per sample: scaled by their own range.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}

# What the decoders read from: a file, or an encoded file's bytes held in memory.
Source = Union[Path, BinaryIO]


class ImageDecodeError(DataError):
    """One image file cannot be used; ``reason`` says why, without the path."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_gray(path: Path | str) -> np.ndarray:
    """Decode ``path`` at full resolution to a 2-D uint8 grayscale array.

    8-bit data is kept as is; 16-bit, 32-bit and float data are scaled by
    their actual min..max (a 12-bit image stored in 16 bits would be nearly
    black if divided by 256). DICOM gets its modality LUT, then its VOI LUT or
    window, and MONOCHROME1 is inverted so that bone is always bright. Alpha
    is dropped. Raises :class:`ImageDecodeError` (a DataError) for any file
    that cannot be decoded.
    """
    return load_gray_noted(path)[0]


def load_gray_noted(path: Path | str) -> tuple[np.ndarray, tuple[str, ...]]:
    """:func:`load_gray`, plus notes on what the decode silently discarded
    (``ALPHA_DROPPED``), so a cache build can tell the user once with a count."""
    path = Path(path)
    _check_file(path)
    if _is_dicom(path):
        return _load_dicom(path, path), ()
    return _load_raster(path, path)


def load_gray_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """:func:`load_gray` of an encoded file held in memory (PNG, JPEG, TIFF, ..., or a DICOM
    Part 10 file, recognised by its "DICM" magic as there is no suffix to go by); errors
    name the image as ``name``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(name, f"expected the bytes of an image file, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError(name, "empty (0 bytes)")
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return _load_dicom(io.BytesIO(data), name)
    return _load_raster(io.BytesIO(data), name)[0]


def to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short edge of ``img`` to ``size`` and centre-crop to ``size`` x ``size`` (uint8)."""
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {img.shape}")
    img = _as_uint8(img)
    h, w = img.shape
    scale = size / min(h, w)
    if scale != 1.0:
        # Short edge exactly ``size``; the long edge never rounds below it.
        new_w = size if w <= h else max(size, round(w * scale))
        new_h = size if h <= w else max(size, round(h * scale))
        # INTER_AREA averages the source pixels (no aliasing, no moire on
        # grids/text) when shrinking; bilinear is smooth and free of the ringing
        # that bicubic adds at sharp edges when enlarging.
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        img = cv2.resize(img, (new_w, new_h), interpolation=interp)
        h, w = img.shape
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[top : top + size, left : left + size])


# --------------------------------------------------------------------------- checks


def _check_file(path: Path) -> None:
    """Fail early, with a plain reason, for files no decoder should even open."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e.strerror or e})") from None
    if not path.is_file():
        raise ImageDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "file is empty (0 bytes)")


def _is_dicom(path: Path) -> bool:
    """By suffix, or by the "DICM" magic for DICOM files without one."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    """A short human reason for a decoder exception."""
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        return "not an image / cannot be decoded (unrecognised file format)"
    if "truncated" in msg.lower() or isinstance(exc, EOFError):
        return f"truncated ({msg})"
    return f"not an image / cannot be decoded ({msg})"


# --------------------------------------------------------------------------- raster


def _load_raster(source: Source, name: Path | str) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        with Image.open(source) as im:
            if im.format in ("JPEG", "MPO") and im.mode == "RGB":
                im.draft("L", im.size)  # decode luma only, at full scale
            im.load()  # raises on truncated data
            ImageOps.exif_transpose(im, in_place=True)
            alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
            return _pil_to_gray(im), (ALPHA_DROPPED,) if alpha else ()
    except MemoryError:
        raise
    except ImageDecodeError:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageDecodeError(name, _reason(e)) from e


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image of any mode -> 2-D uint8."""
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in _WIDE_MODES:
        return window_to_uint8(np.asarray(im))
    # RGB(A), LA, P/PA (palette), CMYK, YCbCr, 1, ...: Pillow converts to luma
    # (ITU-R 601) and drops alpha.
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def window_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map ``lo..hi`` (default: the array's own finite min..max) to 0..255, clipping outside."""
    a = np.asarray(arr, dtype=np.float32)
    if lo is None or hi is None:
        vals = a
        if np.asarray(arr).dtype.kind == "f":  # NaN/inf must not set the range
            finite = np.isfinite(a)
            vals = a if finite.all() else a[finite]
        if vals.size == 0:
            return np.zeros(a.shape, dtype=np.uint8)
        lo = float(vals.min()) if lo is None else lo
        hi = float(vals.max()) if hi is None else hi
    if not hi > lo:  # a constant image carries no contrast
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.nan_to_num(a, nan=lo) - lo) * np.float32(255.0 / (hi - lo)) + np.float32(0.5)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _as_uint8(img: np.ndarray) -> np.ndarray:
    return img if img.dtype == np.uint8 else window_to_uint8(img)


# --------------------------------------------------------------------------- DICOM


def _load_dicom(source: Source, name: Path | str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError:
            if not isinstance(source, Path):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)  # some writers omit the preamble
        if "PixelData" not in ds:
            raise ImageDecodeError(name, "not an image / cannot be decoded (DICOM without pixel data)")
        arr = _dicom_pixels(name, ds)
        return _dicom_to_gray(ds, arr)
    except (MemoryError, ImageDecodeError):
        raise
    except Exception as e:
        raise ImageDecodeError(name, _reason(e)) from e


def _dicom_pixels(path: Path | str, ds) -> np.ndarray:
    """The stored pixels of the first frame; a compressed file without a decoder plugin gets an install hint."""
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts) or "unknown"
        raise ImageDecodeError(
            path,
            f"cannot decode DICOM pixel data (transfer syntax {name}): {e}; compressed DICOM "
            "needs a decoder plugin, e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg",
        ) from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]  # multi-frame: the first frame is the image
    if arr.ndim != (3 if samples > 1 else 2):
        raise ImageDecodeError(path, f"unexpected DICOM pixel array shape {arr.shape}")
    return arr


def _dicom_to_gray(ds, arr: np.ndarray) -> np.ndarray:
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _dicom_colour_to_gray(ds, arr, photometric)
    apply_modality_lut, apply_voi_lut, apply_voi, apply_windowing = _pixel_luts()
    values = apply_modality_lut(arr, ds)
    try:
        shown = apply_voi_lut(values, ds)
        lo, hi = _voi_output_range(ds, apply_voi, apply_windowing)
    except ValueError:  # a malformed window (e.g. width 0): fall back to the data's own range
        shown, lo, hi = values, None, None
    if shown is values:  # no VOI transform: window by the data's own range
        lo = hi = None
    out = window_to_uint8(shown, lo, hi)
    if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
        np.subtract(255, out, out=out)
    return out


def _voi_output_range(ds, apply_voi, apply_windowing) -> tuple[float | None, float | None]:
    """The output range of the VOI transform that ``apply_voi_lut`` applied.

    Scaling a windowed image by this range (not by the data's own min..max)
    keeps the window's meaning for an image that does not fill the window.
    Mirrors ``apply_voi_lut``'s choice: a VOI LUT sequence wins over a window.
    """
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        n_entries, first, _bits = (int(v) for v in seq[0].LUTDescriptor)
        out = apply_voi(np.arange(first, first + (n_entries or 2**16), dtype=np.int64), ds)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        with np.errstate(all="ignore"):  # the probe is far outside any window on purpose
            out = apply_windowing(np.array([-1e30, 1e30]), ds)
    else:
        return None, None
    lo, hi = float(np.min(out)), float(np.max(out))
    return (lo, hi) if hi > lo else (None, None)


def _dicom_colour_to_gray(ds, arr: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom 2.x
            from pydicom.pixel_data_handlers.util import apply_color_lut
        arr = apply_color_lut(arr, ds)
    # pydicom converts YBR to RGB by default, so ``arr`` is RGB here.
    return cv2.cvtColor(np.ascontiguousarray(_as_uint8(arr)), cv2.COLOR_RGB2GRAY)


def _pixel_luts():
    """pydicom >= 3 exposes the LUT functions in ``pydicom.pixels``; 2.x in ``pixel_data_handlers.util``."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, apply_windowing
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (
            apply_modality_lut,
            apply_voi,
            apply_voi_lut,
            apply_windowing,
        )
    return apply_modality_lut, apply_voi_lut, apply_voi, apply_windowing
