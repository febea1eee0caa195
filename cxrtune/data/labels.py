"""Label schemes: how a source's fine labels become the classes of a task.

A scheme maps fine labels (manifest.FINE_LABELS) to task classes. Fine labels it
does not map are dropped and reported, never silently. ``multi_to_binary`` is
trained as three_class and additionally scored as healthy vs infected by summing
class probabilities; ``binary_groups`` exposes that mapping.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..registry import Registry
from .manifest import Record


@dataclass(frozen=True)
class LabelScheme:
    """A task's classes and the fine labels each one is made of."""

    name: str
    classes: tuple[str, ...]
    members: dict[str, tuple[str, ...]]  # task class -> fine labels
    # For multi_to_binary: binary class -> task classes whose probabilities it sums.
    binary_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def class_of(self, fine_label: str) -> str | None:
        """The task class of a fine label, or None when the task does not use it."""
        for cls, fines in self.members.items():
            if fine_label in fines:
                return cls
        return None

    def index_of(self, task_class: str) -> int:
        return self.classes.index(task_class)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def binary_matrix(self) -> np.ndarray:
        """(num_classes, 2) 0/1 matrix; ``probs @ M`` gives healthy/infected probabilities."""
        if not self.binary_groups:
            raise ValueError(f"task {self.name!r} has no binary scoring")
        groups = list(self.binary_groups)
        m = np.zeros((self.num_classes, len(groups)), dtype=np.float32)
        for j, g in enumerate(groups):
            for cls in self.binary_groups[g]:
                m[self.index_of(cls), j] = 1.0
        return m

    def to_binary_probs(self, probs: np.ndarray) -> np.ndarray:
        """Sum class probabilities into the binary groups (rows still sum to 1)."""
        return np.asarray(probs, dtype=np.float64) @ self.binary_matrix()


SCHEMES: Registry[LabelScheme] = Registry("task")

_PNEUMONIA = ("bacterial", "streptococcus", "viral", "covid", "sars", "ards", "stress_smoking", "pneumonia")
_BACTERIAL = ("bacterial", "streptococcus")
_VIRAL_NO_COVID = ("viral", "sars", "ards")

SCHEMES.add("binary", LabelScheme("binary", ("normal", "pneumonia"),
                                  {"normal": ("normal",), "pneumonia": _PNEUMONIA}))
SCHEMES.add("three_class", LabelScheme(
    "three_class", ("normal", "bacterial", "viral"),
    {"normal": ("normal",), "bacterial": _BACTERIAL, "viral": _VIRAL_NO_COVID + ("covid",)}))
SCHEMES.add("four_class", LabelScheme(
    "four_class", ("normal", "bacterial", "viral", "covid"),
    {"normal": ("normal",), "bacterial": _BACTERIAL, "viral": _VIRAL_NO_COVID, "covid": ("covid",)}))
SCHEMES.add("multi_to_binary", LabelScheme(
    "multi_to_binary", ("normal", "bacterial", "viral"),
    {"normal": ("normal",), "bacterial": _BACTERIAL, "viral": _VIRAL_NO_COVID + ("covid",)},
    binary_groups={"healthy": ("normal",), "infected": ("bacterial", "viral")}))


@dataclass(frozen=True)
class Labelled:
    """Records that made it into the task, with their task class, and what was dropped."""

    records: tuple[Record, ...]
    targets: tuple[str, ...]  # task class per record
    dropped: dict[str, tuple[int, str]]  # fine label -> (count, reason)


def apply_scheme(records: list[Record], scheme: LabelScheme, min_class_count: int = 3,
                 source: str = "") -> Labelled:
    """Map fine labels to task classes.

    Fine labels the task does not use, and fine labels with fewer than
    ``min_class_count`` images (CoronaHack's 2 Stress-Smoking images, say), are
    dropped and returned in ``dropped`` so callers can report them. A task class
    left with no images is an error: training on it would be meaningless.
    """
    counts = Counter(r.label for r in records)
    dropped: dict[str, tuple[int, str]] = {}
    for fine, n in sorted(counts.items()):
        if scheme.class_of(fine) is None:
            dropped[fine] = (n, f"not part of task {scheme.name!r}")
        elif n < min_class_count:
            dropped[fine] = (n, f"fewer than min_class_count={min_class_count} images")
    kept = [r for r in records if r.label not in dropped]
    targets = [scheme.class_of(r.label) for r in kept]
    present = Counter(targets)
    empty = [c for c in scheme.classes if present[c] == 0]
    if empty:
        where = f" from source {source!r}" if source else ""
        raise DataError(
            f"task {scheme.name!r} has no images for class(es) {', '.join(empty)}{where} after "
            f"filtering (found fine labels: {dict(sorted(counts.items()))}, dropped: "
            f"{ {k: v[0] for k, v in dropped.items()} }); choose a task whose classes the data "
            f"has (e.g. 'binary'), or lower data.min_class_count")
    return Labelled(tuple(kept), tuple(targets), dropped)  # type: ignore[arg-type]
