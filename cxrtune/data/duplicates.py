"""Near-duplicate images by a perceptual hash over the image cache.

The same radiograph saved twice, or re-exported at another size or quality, in two
splits silently inflates test scores. Each cached image is reduced to its 63
lowest-frequency DCT coefficients (the pHash construction, kept as a unit vector
instead of being binarised): resizing and re-compression barely move them, while
the cosine similarity of two different radiographs stays below 0.99 even though
all chest X-rays share one anatomy. Binarised hashes (aHash/dHash/pHash bits)
were measured to confuse distinct chest images at the distances re-encoded
copies reach, so the unbinarised form is used.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

DCT_SIDE = 8  # 8x8 lowest frequencies, DC dropped: 63 coefficients
RESIZE = 32
DEFAULT_MIN_SIMILARITY = 0.99


def signature(img: np.ndarray) -> np.ndarray:
    """Unit vector of the low-frequency DCT coefficients of one uint8 image."""
    small = cv2.resize(img, (RESIZE, RESIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    coeffs = cv2.dct(small)[:DCT_SIDE, :DCT_SIDE].ravel()[1:]
    return coeffs / (np.linalg.norm(coeffs) + 1e-6)


def signatures(images: np.ndarray) -> np.ndarray:
    """(N, 63) float32 signatures of an (N, H, W) uint8 array (memmaps are read in order)."""
    out = np.zeros((len(images), DCT_SIDE * DCT_SIDE - 1), np.float32)
    for i in range(len(images)):
        out[i] = signature(np.asarray(images[i]))
    return out


def signatures_of(images: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """(len(rows), 63) signatures of ``images[rows[i]]``, in that order: the cache's pixels
    serve as they are, one 32 px DCT per image, no copy of the array."""
    out = np.zeros((len(rows), DCT_SIDE * DCT_SIDE - 1), np.float32)
    for k, row in enumerate(rows):
        out[k] = signature(np.asarray(images[row]))
    return out


def duplicate_groups(sig: np.ndarray, min_similarity: float = DEFAULT_MIN_SIMILARITY,
                     block: int = 1024) -> list[list[int]]:
    """Indices of images whose signatures have cosine similarity >= ``min_similarity``,
    grouped transitively (union-find); only groups of two or more are returned.
    Blocked matrix products keep memory at block x N floats for any dataset size."""
    parent = np.arange(len(sig))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(sig), block):
        sim = sig[start:start + block] @ sig.T
        for a, b in zip(*np.nonzero(sim >= min_similarity)):
            i, j = start + int(a), int(b)
            if i < j:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(sig)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
