"""What a served model takes as an image, and how each image becomes what the trial saw.

An image is a file path, the bytes of an encoded file (PNG, JPEG, TIFF, BMP, DICOM, ...)
or a grayscale array (2-D; uint8, uint16, any integer or float). Each one goes through
the very steps the trial's images went through, by the same functions:

1. decoded to 2-D grayscale (``data/decode.py``, as the image cache decodes files: 8- and
   16-bit, EXIF orientation, DICOM LUTs and MONOCHROME1, colour to luma, alpha dropped);
2. short edge resized and centre-cropped to the model's size (``decode.to_square``, the
   cache's own per-image step; wide arrays are scaled by their own range there, as a
   16-bit file is);
3. CXR-Norm with the trial's parameters (``data/cxrnorm.py``: the OpenCV path, the one
   the test evaluation reads).

The evaluation transform and the model come after (``model.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from ..data.cxrnorm import apply as cxrnorm_apply
from ..data.cxrnorm_config import CXRNormConfig
from ..data.decode import ImageDecodeError, load_gray, load_gray_bytes, to_square
from ..errors import DataError

__all__ = ["IMAGE_COLUMN", "PATH_COLUMN", "ImageInput", "NamedImage", "images_of", "gray_of", "model_image"]

# The columns of a DataFrame input (the model's signature): encoded bytes or arrays, or paths.
IMAGE_COLUMN, PATH_COLUMN = "image", "path"
# A 3-D array is a stack of images (N, H, W); one whose last axis is this short is a
# colour picture (H, W, C), which is refused rather than read as C-pixel-wide images.
_COLOUR_CHANNELS = (3, 4)

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]


@dataclass(frozen=True)
class NamedImage:
    """One input image and the name messages give it: its path, or ``image[i]``."""

    name: str
    value: ImageInput


def images_of(model_input: Any) -> list[NamedImage]:
    """The images of a model input, in order.

    ``model_input``: a DataFrame with an ``image`` column (encoded bytes, or 2-D arrays)
    or a ``path`` column (files on the machine running the model); a 2-D array (one
    image) or a 3-D array (N, H, W) (a stack); a path; bytes; or a list of these items."""
    if isinstance(model_input, pd.DataFrame):
        return _frame_images(model_input)
    if isinstance(model_input, np.ndarray):
        return _array_images(model_input)
    if isinstance(model_input, (str, os.PathLike, bytes, bytearray)):
        return [_named(model_input, 0)]
    if isinstance(model_input, (list, tuple)):
        return [_named(item, i) for i, item in enumerate(model_input)]
    raise DataError(f"cannot read images from a {type(model_input).__name__}: give a DataFrame with an "
                    f"{IMAGE_COLUMN!r} column (encoded bytes or 2-D arrays) or a {PATH_COLUMN!r} column "
                    "(file paths), a 2-D or (N, H, W) grayscale array, or a list of paths, bytes or arrays")


def _frame_images(frame: pd.DataFrame) -> list[NamedImage]:
    given = [c for c in (IMAGE_COLUMN, PATH_COLUMN) if c in frame.columns]
    if len(given) != 1:
        what = "both" if given else f"neither (its columns: {', '.join(map(str, frame.columns)) or 'none'})"
        raise DataError(f"a DataFrame of images needs exactly one of the columns {IMAGE_COLUMN!r} (encoded "
                        f"bytes or 2-D arrays) and {PATH_COLUMN!r} (file paths); this one has {what}. A loaded "
                        "pyfunc model turns a bare array into a table by its signature: give arrays as "
                        f"pd.DataFrame({{{IMAGE_COLUMN!r}: list(arrays)}})")
    return [_named(value, i) for i, value in enumerate(frame[given[0]].tolist())]


def _array_images(array: np.ndarray) -> list[NamedImage]:
    if array.ndim == 2:
        return [NamedImage("image[0]", array)]
    if array.ndim == 3 and array.shape[-1] not in _COLOUR_CHANNELS:
        return [NamedImage(f"image[{i}]", a) for i, a in enumerate(array)]
    raise DataError(f"a {array.dtype} array of shape {array.shape} is not a grayscale image (H, W) or a stack "
                    "of them (N, H, W); pass a colour picture as its encoded file's bytes (PNG, JPEG) or "
                    "convert it to grayscale first")


def _named(value: Any, i: int) -> NamedImage:
    if isinstance(value, (str, os.PathLike)):
        return NamedImage(str(value), value)
    return NamedImage(f"image[{i}]", value)


def gray_of(image: NamedImage) -> np.ndarray:
    """The image decoded to a 2-D grayscale array; an :class:`ImageDecodeError` naming
    it when it cannot be."""
    value = image.value
    if isinstance(value, (str, os.PathLike)):
        return load_gray(Path(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return load_gray_bytes(bytes(value), image.name)
    if isinstance(value, np.ndarray):
        return _checked_array(value, image.name)
    raise ImageDecodeError(image.name, f"not an image: a {type(value).__name__} (give a path, the bytes of "
                                       "an image file, or a 2-D grayscale array)")


def _checked_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim != 2 or array.size == 0:
        raise ImageDecodeError(name, f"a {array.dtype} array of shape {array.shape} is not a 2-D grayscale "
                                     "image; colour pictures go in as their encoded file's bytes")
    if array.dtype.kind not in "uif":
        raise ImageDecodeError(name, f"pixels of dtype {array.dtype} are not numbers")
    return array


def model_image(gray: np.ndarray, size: int, cxrnorm: CXRNormConfig) -> np.ndarray:
    """uint8 (size, size): the cache's square crop of ``gray``, then the trial's CXR-Norm."""
    return cxrnorm_apply(to_square(gray, size), cxrnorm)
