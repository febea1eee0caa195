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
    # Why the task cannot be trained on these records (empty or too small classes);
    # apply_scheme raises them, audit_scheme (for `data inspect`) only returns them.
    problems: tuple[str, ...] = ()


# Reasons in ``Labelled.dropped``; distinct so a report can tell "not used" from "too few".
NOT_IN_TASK = "not part of task {task!r}"
TOO_FEW = "task class {cls!r} has only {n} image(s), fewer than min_class_count={k}"


def audit_scheme(records: list[Record], scheme: LabelScheme, min_class_count: int = 3,
                 source: str = "") -> Labelled:
    """Map fine labels to task classes without raising; problems are returned.

    Fine labels the task does not use (Kermany's untyped "pneumonia" in a
    three-class task, say) are dropped as "not part of task". ``min_class_count``
    applies to the task's classes AFTER mapping: binary's "pneumonia" counts its
    viral, COVID-19 and SARS images together, so a handful of COVID-19 images is
    kept. A task class below the threshold (or empty) cannot be trained on: its
    images are dropped and the reason is a problem.
    """
    counts = Counter(r.label for r in records)
    dropped: dict[str, tuple[int, str]] = {}
    for fine, n in sorted(counts.items()):
        if scheme.class_of(fine) is None:
            dropped[fine] = (n, NOT_IN_TASK.format(task=scheme.name))
    per_class = Counter(scheme.class_of(r.label) for r in records if r.label not in dropped)
    small = [c for c in scheme.classes if 0 < per_class[c] < min_class_count]
    for fine, n in sorted(counts.items()):
        if scheme.class_of(fine) in small:
            cls = scheme.class_of(fine)
            dropped[fine] = (n, TOO_FEW.format(cls=cls, n=per_class[cls], k=min_class_count))
    kept = [r for r in records if r.label not in dropped]
    targets = tuple(scheme.class_of(r.label) for r in kept)
    problems = _class_problems(scheme, counts, per_class, min_class_count, source)
    return Labelled(tuple(kept), targets, dropped, problems)  # type: ignore[arg-type]


def apply_scheme(records: list[Record], scheme: LabelScheme, min_class_count: int = 3,
                 source: str = "") -> Labelled:
    """:func:`audit_scheme`, raising DataError when a task class is empty or too small:
    training on it would be meaningless."""
    labelled = audit_scheme(records, scheme, min_class_count, source)
    if labelled.problems:
        raise DataError("; ".join(labelled.problems))
    return labelled


def _class_problems(scheme: LabelScheme, fine_counts: Counter, per_class: Counter,
                    min_class_count: int, source: str) -> tuple[str, ...]:
    empty = [c for c in scheme.classes if per_class[c] == 0]
    small = [c for c in scheme.classes if 0 < per_class[c] < min_class_count]
    if not empty and not small:
        return ()
    where = f" from source {source!r}" if source else ""
    found = f"fine labels found: {dict(sorted(fine_counts.items()))}"
    fixes = []
    fitting = tasks_that_fit(fine_counts, min_class_count, exclude=scheme.name)
    if fitting:
        fixes.append(f"choose a task whose classes the data has (--task {fitting[0]}, or data.task: "
                     f"{fitting[0]}; fitting: {', '.join(fitting)})")
    fixes.append("add images of the class")
    if small:
        lowest = min(per_class[c] for c in small)
        fixes.append(f"or train on it anyway by lowering the threshold (--min-class-count {lowest}, "
                     f"or data.min_class_count: {lowest})")
    problems = []
    if empty:
        problems.append(f"task {scheme.name!r} has no images for class(es) {', '.join(empty)}{where}")
    if small:
        shown = ", ".join(f"{c} ({per_class[c]})" for c in small)
        problems.append(f"task {scheme.name!r} class(es) {shown}{where} have fewer than "
                        f"min_class_count={min_class_count} images")
    return (f"{' and '.join(problems)} ({found}); fix: {'; '.join(fixes)}",)


def tasks_that_fit(fine_counts: Counter, min_class_count: int, exclude: str = "") -> list[str]:
    """Tasks (other than ``exclude``) every class of which has >= ``min_class_count`` images,
    most classes first."""
    fitting = []
    for name in SCHEMES.names():
        scheme = SCHEMES.get(name)
        per_class = Counter()
        for fine, n in fine_counts.items():
            per_class[scheme.class_of(fine)] += n
        if name != exclude and all(per_class[c] >= min_class_count for c in scheme.classes):
            fitting.append(name)
    # The task closest to the one asked for (most classes) first.
    return sorted(fitting, key=lambda n: (-SCHEMES.get(n).num_classes, n))
