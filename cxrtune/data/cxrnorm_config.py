"""CXR-Norm settings: ``CXRNormConfig`` and the method names, without OpenCV.

The methods themselves are registered by ``cxrnorm.py`` under the names declared
here, and imported when images are normalised.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

METHODS: Registry[Callable[[np.ndarray, CXRNormConfig], np.ndarray]] = Registry(
    "CXR-Norm method", names=("cxrnorm", "histeq_blur", "none"), provider="cxrtune.data.cxrnorm")

# Bump when the output of a method changes for the same parameters: memo files
# written by an older implementation then stop matching.
_ALGO_VERSION = 1
_MAX_MEDIAN_KERNEL = 255


@dataclass(frozen=True)
class CXRNormConfig:
    """Parameters of the normalisation; every field is searchable."""

    method: str = "cxrnorm"  # registry: "cxrnorm" | "histeq_blur" | "none"
    clahe: bool = True
    clip_limit: float = 2.0
    tile_grid: int = 8  # CLAHE tile grid tile_grid x tile_grid
    median_kernel: int = 5  # odd >= 1; 1 = off
    stretch: bool = True
    low_pct: float = 2.0
    high_pct: float = 98.0

    def validate(self, where: str = "preprocess") -> None:
        """Raise one ConfigError listing every invalid parameter (one line each)."""
        problems: list[str] = []

        def bad(param: str, value: object, expected: str) -> None:
            problems.append(f"{where}.{param} = {value!r}: {expected}")

        if not isinstance(self.method, str) or self.method not in METHODS:
            bad("method", self.method, f"unknown CXR-Norm method; valid methods: {', '.join(METHODS.names())}")
        for name in ("clahe", "stretch"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                bad(name, value, "must be true or false")
        if not _is_real(self.clip_limit) or not self.clip_limit > 0:
            bad("clip_limit", self.clip_limit, "must be a number > 0 (e.g. 2.0)")
        if not _is_int(self.tile_grid) or self.tile_grid < 1:
            bad("tile_grid", self.tile_grid, "must be an integer >= 1 (e.g. 8 for an 8x8 grid)")
        k = self.median_kernel
        if not _is_int(k) or k < 1 or k % 2 == 0 or k > _MAX_MEDIAN_KERNEL:
            bad(
                "median_kernel",
                k,
                f"must be an odd integer in 1..{_MAX_MEDIAN_KERNEL} (e.g. 3 or 5; 1 = off)",
            )
        pct_ok = True
        for name in ("low_pct", "high_pct"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 100:
                bad(name, value, "must be a percentile in 0..100 (e.g. low_pct 2, high_pct 98)")
                pct_ok = False
        if pct_ok and not self.low_pct < self.high_pct:
            bad(
                "low_pct",
                self.low_pct,
                f"must be < {where}.high_pct = {self.high_pct!r} (e.g. low_pct 2, high_pct 98)",
            )
        if problems:
            s = "s" if len(problems) > 1 else ""
            raise ConfigError(f"invalid {where} config ({len(problems)} problem{s}):\n  " + "\n  ".join(problems))

    def effective(self) -> dict[str, object]:
        """The parameters that affect the output (disabled steps dropped).

        A ``cxrnorm`` config whose steps are all off is the identity and reads as
        ``{"method": "none"}``.
        """
        if self.method != "cxrnorm":
            return {"method": self.method}
        params: dict[str, object] = {}
        if self.clahe:
            params["clip_limit"] = float(self.clip_limit)
            params["tile_grid"] = int(self.tile_grid)
        if int(self.median_kernel) > 1:
            params["median_kernel"] = int(self.median_kernel)
        if self.stretch:
            params["low_pct"] = float(self.low_pct)
            params["high_pct"] = float(self.high_pct)
        if not params:
            return {"method": "none"}
        return {"method": "cxrnorm", **params}

    @property
    def is_identity(self) -> bool:
        return self.effective() == {"method": "none"}

    def key(self) -> str:
        """Short stable hash of the effective parameters (for memoisation)."""
        blob = json.dumps({"v": _ALGO_VERSION, **self.effective()}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


__all__ = ["CXRNormConfig", "METHODS"]
