"""The manifest: one row per image, the common currency of every source adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Fine labels an adapter may emit. Label schemes (labels.py) map them to task classes.
FINE_LABELS = (
    "normal",
    "bacterial",
    "streptococcus",
    "viral",
    "covid",
    "sars",
    "ards",
    "stress_smoking",
    "pneumonia",  # pneumonia of unknown type (e.g. a binary-only source)
    "lung_opacity",  # COVID-19 Radiography DB's non-COVID lung infection class
)

OFFICIAL_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image as a source describes it.

    path: absolute path to the image file.
    label: one of FINE_LABELS.
    patient_id: the patient the image belongs to, when the source says (else None:
        each image is then its own group when splitting).
    split: the source's official split ("train", "val" or "test"), or None.
    origin: where the adapter read it (e.g. "manifest.csv line 7"), for messages only.
    """

    path: Path
    label: str
    patient_id: str | None = None
    split: str | None = None
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.label not in FINE_LABELS:
            raise ValueError(f"internal: adapter emitted unknown fine label {self.label!r}")
        if self.split is not None and self.split not in OFFICIAL_SPLITS:
            raise ValueError(f"internal: adapter emitted unknown split {self.split!r}")
