"""Source adapters: turn a downloaded dataset folder into manifest Records.

Each public dataset ships in its own layout (metadata CSV, class folders, labels
hidden in file names). An adapter knows one layout and returns the same thing for
all of them: one ``Record`` per image with an absolute path, a fine label from
``FINE_LABELS``, the patient id where the source has one and the official split
where it has one. Adapters are chosen by name through ``SOURCES``; callers use
``load_records``, which adds the checks every source needs.

Archives often unpack with one or two extra folder levels, so adapters search a
few levels below the given root for their marker (a metadata file or a class
folder) instead of insisting the user point at the exact folder.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from ..errors import DataError
from ..registry import Registry
from .manifest import FINE_LABELS, OFFICIAL_SPLITS, Record

logger = logging.getLogger(__name__)

__all__ = ["CORONAHACK_COLUMNS", "CORONAHACK_CSV", "CORONAHACK_IMAGES", "IMAGE_EXTENSIONS", "LABEL_ALIASES",
           "SOURCES", "SourceAudit", "load_records", "read_source"]

Adapter = Callable[[Path], list[Record]]

SOURCES: Registry[Adapter] = Registry("source")

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})

# How many folder levels below the root an adapter looks for its marker.
_SEARCH_DEPTH = 3
# How many examples an error message shows before "..."; enough to spot a pattern.
_EXAMPLES = 5

# Expected layout of each source, shown when a root yields no images.
_LAYOUTS: dict[str, str] = {}

# Folder / CSV label spellings -> fine label, keyed by _normalise_name() form.
LABEL_ALIASES: dict[str, str] = {
    "normal": "normal",
    "healthy": "normal",
    "no-finding": "normal",
    "bacteria": "bacterial",
    "bacterial": "bacterial",
    "pneumonia-bacterial": "bacterial",
    "bacterial-pneumonia": "bacterial",
    "virus": "viral",
    "viral": "viral",
    "pneumonia-viral": "viral",
    "viral-pneumonia": "viral",
    "covid": "covid",
    "covid-19": "covid",
    "covid19": "covid",
    "sars-cov-2": "covid",
    "pneumonia": "pneumonia",
    "lung-opacity": "lung_opacity",
    "streptococcus": "streptococcus",
    "sars": "sars",
    "ards": "ards",
    "stress-smoking": "stress_smoking",
}

# Split folder / CSV spellings -> official split.
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _normalise_name(name: str) -> str:
    """Case-, space- and underscore-insensitive key: ``"Viral Pneumonia"`` -> ``"viral-pneumonia"``."""
    return re.sub(r"[-_\s]+", "-", name.strip().lower())


# Every fine label must be reachable under its own name, or a CSV written from
# our own manifest could not be read back.
assert all(_normalise_name(f) in LABEL_ALIASES for f in FINE_LABELS)


# --------------------------------------------------------------------------- registry


def _source(name: str, layout: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter under ``name`` with its expected ``layout`` description.

    The wrapper resolves the root (so every path comes out absolute, symlinks and
    ``..`` gone) and sorts records by path, so every adapter is deterministic
    without repeating that code.
    """

    def register(fn: Adapter) -> Adapter:
        @functools.wraps(fn)
        def adapter(root: Path) -> list[Record]:
            records = fn(Path(root).expanduser().resolve())
            return sorted(records, key=lambda r: r.path)

        SOURCES.add(name, adapter)
        _LAYOUTS[name] = layout
        return adapter

    return register


@dataclass(frozen=True)
class SourceAudit:
    """What an adapter found: the records (each file once, the first row kept), the
    exact repeats left out, and the files listed twice in contradiction."""

    records: list[Record]
    repeated: list[str]  # "path (line 3 = line 9)": same file, label, patient and split
    conflicts: list[str]  # same file under two labels, patients or official splits


_FIX_ROOT = "set --root (or data.root) to the folder the dataset archive unpacked to"


def _check_root(source: str, root: Path) -> None:
    if not root.exists():
        raise DataError(
            f"dataset root {str(root)!r} for source {source!r} does not exist; fix: download and "
            f"unpack the dataset there, or {_FIX_ROOT}"
        )


def _no_images(source: str, root: Path) -> DataError:
    return DataError(
        f"no images found for source {source!r} under {str(root.resolve())!r}; "
        f"expected layout: {_LAYOUTS.get(source, 'see the adapter docs')}; fix: {_FIX_ROOT}, "
        f"or pick the --source (data.source) of that layout"
    )


def read_source(source: str, root: str | Path) -> SourceAudit:
    """Read the dataset at ``root`` with the adapter called ``source``, without failing on
    files listed twice (for `data inspect`, which reports them).

    Raises DataError when the root does not exist or holds no images, and
    ConfigError (listing the valid names) when ``source`` is unknown. Decodes nothing.
    """
    root = Path(root).expanduser()
    _check_root(source, root)
    adapter = SOURCES.get(source)
    records = adapter(root)
    if not records:
        raise _no_images(source, root)
    return _same_file_audit(records)


def load_records(source: str, root: str | Path) -> list[Record]:
    """:func:`read_source`, refusing contradictions.

    A file listed under two labels, patient ids or official splits would put one
    image in two classes or two splits: DataError naming the rows. Exact repeats
    (same file, label, patient, split) are harmless: the first is kept, with a warning.
    """
    audit = read_source(source, root)
    if audit.conflicts:
        raise DataError(
            f"{len(audit.conflicts)} image file(s) of source {source!r} are listed more than once "
            f"with different labels, patient ids or splits, so one image would be in two classes "
            f"or two splits: {_examples(audit.conflicts, 3)}; fix: keep one row per image in the "
            f"manifest (delete the wrong rows), or remove the extra copy or link of the file"
        )
    if audit.repeated:
        logger.warning(
            "%s: %d exact duplicate row(s) (same file, label, patient and split) left out, the "
            "first row kept: %s", source, len(audit.repeated), _examples(audit.repeated, 3))
    _log_summary(source, Path(root).expanduser(), audit.records)
    return audit.records


def _where(r: Record) -> str:
    return r.origin or str(r.path)


def _describe(r: Record) -> str:
    return f"{_where(r)}: label {r.label}, patient {r.patient_id or '-'}, split {r.split or '-'}"


def _same_file_audit(records: list[Record]) -> SourceAudit:
    """Find files reached more than once (by two rows, or by two paths to one file)."""
    first: dict[str, Record] = {}
    kept, repeated, conflicts = [], [], []
    for r in records:
        # realpath: a symlink or "./a.png" next to "a.png" is the same image.
        key = os.path.normcase(os.path.realpath(r.path))
        seen = first.get(key)
        if seen is None:
            first[key] = r
            kept.append(r)
        elif (seen.label, seen.patient_id, seen.split) == (r.label, r.patient_id, r.split):
            repeated.append(f"{r.path} ({_where(seen)} = {_where(r)})")
        else:
            conflicts.append(f"{key} ({_describe(seen)} vs {_describe(r)})")
    return SourceAudit(kept, repeated, conflicts)


def _log_summary(source: str, root: Path, records: list[Record]) -> None:
    labels = Counter(r.label for r in records)
    splits = Counter(r.split or "none" for r in records)
    logger.info(
        "source %s at %s: %d images; labels %s; official splits %s",
        source, root, len(records), dict(sorted(labels.items())), dict(sorted(splits.items())),
    )


# --------------------------------------------------------------------------- file helpers


def _is_ignored(name: str) -> bool:
    """macOS archive debris (``__MACOSX``, ``._x``) and hidden entries are never data."""
    return name == "__MACOSX" or name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _is_ignored(path.name) and path.is_file()


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_ignored(p.name))
    except OSError:  # unreadable folder: nothing to find there
        return []


def _child_dirs(folder: Path) -> dict[str, Path]:
    """Sub-folders keyed by normalised name, for case-insensitive lookup."""
    return {_normalise_name(p.name): p for p in _subdirs(folder)}


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (optionally below it), skipping archive debris."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if _is_image(p))
    return sorted(
        p for p in folder.rglob("*")
        if _is_image(p) and not any(_is_ignored(part) for part in p.relative_to(folder).parts)
    )


def _find_dir(root: Path, accept: Callable[[Path], bool], depth: int = _SEARCH_DEPTH) -> Path | None:
    """The shallowest folder at most ``depth`` levels below ``root`` that ``accept`` takes.

    Breadth-first so an archive's top-level copy wins over a duplicate nested
    deeper inside it (e.g. Kermany's ``chest_xray/chest_xray``).
    """
    level = [root] if root.is_dir() else []
    for _ in range(depth + 1):
        hits = [d for d in level if accept(d)]
        if hits:
            return hits[0]
        level = [sub for d in level for sub in _subdirs(d)]
    return None


def _find_class_root(root: Path, class_names: Iterable[str]) -> Path | None:
    """The shallowest folder holding at least one of the class folders ``class_names``."""
    wanted = {_normalise_name(n) for n in class_names}
    return _find_dir(root, lambda d: bool(wanted & _child_dirs(d).keys()))


def _examples(items: list, n: int = _EXAMPLES) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


# --------------------------------------------------------------------------- CSV helpers


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV as strings with empty cells as "" (ids like "007" stay intact)."""
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV {str(path)!r}: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require_columns(df: pd.DataFrame, required: Iterable[str], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{str(path)!r} lacks column(s) {missing}; columns found: {list(df.columns)}"
        )


def _line(index: int) -> int:
    """CSV line number of data row ``index`` (line 1 is the header)."""
    return index + 2


def _check_values(
    df: pd.DataFrame, column: str, ok: Callable[[str], bool], expected: Iterable[str], path: Path
) -> None:
    """Raise DataError listing the values of ``column`` that ``ok`` rejects, with line numbers."""
    bad: dict[str, list[int]] = {}
    for i, value in enumerate(df[column]):
        if not ok(value):
            bad.setdefault(value, []).append(_line(i))
    if not bad:
        return
    shown = [f"{v!r} (line {_examples(lines, 3)})" for v, lines in bad.items()]
    raise DataError(
        f"column {column!r} of {str(path)!r} has {sum(map(len, bad.values()))} row(s) with "
        f"unexpected values: {_examples(shown)}; expected one of: {', '.join(expected)}"
    )


def _require_files(records: list[Record], manifest: Path) -> None:
    """Raise DataError when images listed in ``manifest`` are not on disk."""
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(records)} image(s) listed in {str(manifest)!r} are missing, "
            f"e.g. {_examples(missing)}; fix: re-download and unpack the dataset completely, "
            f"or set --root (or data.root) to the folder that holds these files"
        )


# --------------------------------------------------------------------------- coronahack

# Public: the synthetic dataset writes this layout with the same names.
CORONAHACK_CSV = "Chest_xray_Corona_Metadata.csv"
CORONAHACK_IMAGES = "Coronahack-Chest-XRay-Dataset"
CORONAHACK_COLUMNS = ("X_ray_image_name", "Label", "Dataset_type", "Label_2_Virus_category",
                      "Label_1_Virus_category")
# "Pnemonia" is how the real file spells it.
_CH_LABEL = {"normal": "normal", "pnemonia": "pneumonia", "pneumonia": "pneumonia"}
_CH_SPLIT = {"train": "train", "test": "test"}
# Label_2 is the more specific category, so it wins over Label_1.
_CH_LABEL_2 = {"": None, "covid-19": "covid", "sars": "sars", "ards": "ards", "streptococcus": "streptococcus"}
_CH_LABEL_1 = {"": None, "bacteria": "bacterial", "virus": "viral", "stress-smoking": "stress_smoking"}


def _key(value: str) -> str:
    return value.strip().lower()


def _coronahack_label(label: str, label_2: str, label_1: str) -> str:
    """Fine label of one metadata row (values already validated)."""
    if _CH_LABEL[_key(label)] == "normal":
        return "normal"
    return _CH_LABEL_2[_key(label_2)] or _CH_LABEL_1[_key(label_1)] or "pneumonia"


def _coronahack_image_dir(csv_dir: Path) -> Path:
    """The folder holding ``train/`` and ``test/``; downloads nest it once or twice."""
    for candidate in (csv_dir / CORONAHACK_IMAGES / CORONAHACK_IMAGES, csv_dir / CORONAHACK_IMAGES, csv_dir):
        if candidate.is_dir() and {"train", "test"} & _child_dirs(candidate).keys():
            return candidate
    raise DataError(
        f"found {CORONAHACK_CSV} in {str(csv_dir)!r} but no image folder "
        f"{CORONAHACK_IMAGES}/{CORONAHACK_IMAGES}/{{train,test}}/ (or {CORONAHACK_IMAGES}/{{train,test}}/) next to it; "
        f"fix: unpack the whole Kaggle archive, not only the CSV"
    )


@_source("coronahack", f"{CORONAHACK_CSV} next to {CORONAHACK_IMAGES}/{CORONAHACK_IMAGES}/{{train,test}}/*.jpeg")
def coronahack(root: Path) -> list[Record]:
    """Kaggle praveengovi/coronahack-chest-xraydataset: labels from the metadata CSV."""
    csv_dir = _find_dir(root, lambda d: (d / CORONAHACK_CSV).is_file())
    if csv_dir is None:
        raise DataError(
            f"metadata file {CORONAHACK_CSV} not found in {str(root)!r} or up to {_SEARCH_DEPTH} levels "
            f"below it; fix: set --root (or data.root) to the folder the Kaggle CoronaHack archive unpacks to"
        )
    csv_path = csv_dir / CORONAHACK_CSV
    df = _read_csv(csv_path)
    _require_columns(df, CORONAHACK_COLUMNS, csv_path)
    for column, table in (("Label", _CH_LABEL), ("Dataset_type", _CH_SPLIT),
                          ("Label_2_Virus_category", _CH_LABEL_2), ("Label_1_Virus_category", _CH_LABEL_1)):
        _check_values(df, column, lambda v, t=table: _key(v) in t,
                      [repr(k) for k in table], csv_path)

    image_dir = _coronahack_image_dir(csv_dir)
    folders = _child_dirs(image_dir)
    rows = list(df[list(CORONAHACK_COLUMNS)].itertuples(index=False))
    split_dirs = [folders.get(_key(split), image_dir / _key(split)) for _, _, split, _, _ in rows]
    names = [name for name, *_ in rows]
    paths = [_csv_image_path(name, folder) for name, folder in zip(names, split_dirs)]
    # Same guard as CSV manifests: a name like "../../etc/x.jpeg" must not read outside.
    _check_inside(paths, names, split_dirs, csv_path, "its split folder")
    records = [
        Record(
            path=path,
            label=_coronahack_label(label, l2, l1),
            # CoronaHack's pneumonia/normal images are Kermany's, file names included, so
            # the same patient ids apply (COVID-19 case figures match no pattern: None).
            patient_id=_parse_kermany_name(Path(name.strip()).stem)[0],
            split=_CH_SPLIT[_key(split)],
            origin=f"{csv_path.name} line {_line(i)}",
        )
        for i, (path, (name, label, split, l2, l1)) in enumerate(zip(paths, rows))
    ]
    _require_files(records, csv_path)
    return records


# --------------------------------------------------------------------------- kermany

_KERMANY_CLASSES = ("normal", "pneumonia")
_KERMANY_TYPES = {"bacteria": "bacterial", "virus": "viral"}
# Patient id patterns on the file stem. NORMAL2-IM must come before IM: it is a
# separate id series, not patient IM-<n>. Trailing "-0002"-style suffixes are
# further images of the same patient.
_KERMANY_PATTERNS = (
    re.compile(r"^(?P<pid>person\d+)(?:_(?P<type>bacteria|virus))?(?:_\d+)*$", re.IGNORECASE),
    re.compile(r"^(?P<pid>NORMAL2-IM-\d+)(?:-\d+)+$", re.IGNORECASE),
    re.compile(r"^(?P<pid>IM-\d+)(?:-\d+)+$", re.IGNORECASE),
)


def _parse_kermany_name(stem: str) -> tuple[str | None, str | None]:
    """(patient id, "bacteria"/"virus"/None) from a Kermany file stem; (None, None) if unknown."""
    for pattern in _KERMANY_PATTERNS:
        m = pattern.match(stem)
        if m:
            kind = m.groupdict().get("type")
            return m["pid"], kind.lower() if kind else None
    return None, None


def _is_kermany_root(folder: Path) -> bool:
    """True for a folder with ``{train,val,test}/{NORMAL,PNEUMONIA}/``."""
    splits = _child_dirs(folder)
    return any(
        set(_KERMANY_CLASSES) & _child_dirs(splits[s]).keys() for s in OFFICIAL_SPLITS if s in splits
    )


@_source("kermany", "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg")
def kermany(root: Path) -> list[Record]:
    """Chest X-Ray Images (Pneumonia): split and class from folders, type and patient from file names."""
    base = _find_dir(root, _is_kermany_root)
    if base is None:
        return []
    records: list[Record] = []
    unmatched: list[Path] = []
    split_dirs = _child_dirs(base)
    for split in OFFICIAL_SPLITS:
        split_dir = split_dirs.get(split)
        if split_dir is None:
            continue
        classes = _child_dirs(split_dir)
        for cls in _KERMANY_CLASSES:
            if cls not in classes:
                continue
            for path in _images_in(classes[cls]):
                pid, kind = _parse_kermany_name(path.stem)
                if pid is None:
                    unmatched.append(path)
                label = "normal" if cls == "normal" else _KERMANY_TYPES.get(kind or "", "pneumonia")
                records.append(Record(path, label, pid, split))
    if unmatched:
        logger.warning(
            "kermany: %d file name(s) match no known pattern (e.g. %s); each is treated as its "
            "own patient", len(unmatched), _examples([p.name for p in unmatched]),
        )
    return records


# --------------------------------------------------------------------------- class-folder sources


def _class_folder_records(base: Path, classes: dict[str, str], images_subdir: bool) -> list[Record]:
    """Records from ``base/<class folder>/`` for each known class folder present.

    ``classes`` maps normalised folder name -> fine label. With ``images_subdir``
    a class folder's ``images/`` sub-folder is used when present (masks beside it
    are not images of the dataset).
    """
    records = []
    for name, folder in _child_dirs(base).items():
        label = classes.get(name)
        if label is None:
            continue
        if images_subdir and (folder / "images").is_dir():
            folder = folder / "images"
        records += [Record(path, label) for path in _images_in(folder)]
    return records


_COVID_RADIOGRAPHY_CLASSES = {
    "covid": "covid",
    "covid-19": "covid",  # version 1 name
    "normal": "normal",
    "lung-opacity": "lung_opacity",
    "viral-pneumonia": "viral",
}


@_source("covid_radiography",
         "COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/images/*.png")
def covid_radiography(root: Path) -> list[Record]:
    """COVID-19 Radiography Database: class folders, images in ``images/`` (or directly, in old versions)."""
    base = _find_class_root(root, _COVID_RADIOGRAPHY_CLASSES)
    if base is None:
        return []
    return _class_folder_records(base, _COVID_RADIOGRAPHY_CLASSES, images_subdir=True)


_CURATED_CLASSES = {
    "covid-19": "covid",
    "normal": "normal",
    "pneumonia-bacterial": "bacterial",
    "pneumonia-viral": "viral",
}


@_source("curated", "{COVID-19,Normal,Pneumonia-Bacterial,Pneumonia-Viral}/*.jpg")
def curated(root: Path) -> list[Record]:
    """Mendeley 9xkhgts2s6 curated COVID-19 dataset: one folder per class."""
    base = _find_class_root(root, _CURATED_CLASSES)
    if base is None:
        return []
    return _class_folder_records(base, _CURATED_CLASSES, images_subdir=False)


# --------------------------------------------------------------------------- imagefolder


def _accepted_labels() -> str:
    return ", ".join(LABEL_ALIASES)


def _imagefolder_classes(folder: Path) -> list[tuple[Path, str]]:
    """(class folder, fine label) pairs under ``folder``; unknown names raise DataError."""
    pairs, unknown = [], []
    for sub in _subdirs(folder):
        label = LABEL_ALIASES.get(_normalise_name(sub.name))
        if label is None:
            unknown.append(sub.name)
        else:
            pairs.append((sub, label))
    if unknown:
        raise DataError(
            f"class folder(s) {unknown} in {str(folder)!r} are not known labels; accepted folder "
            f"names (case-insensitive): {_accepted_labels()}; fix: rename the folders, or list "
            f"the images with their labels in a CSV and use source 'csv'"
        )
    return pairs


@_source("imagefolder", "<class>/*.png, or {train,val,test}/<class>/*.png, class = normal, bacterial, viral, ...")
def imagefolder(root: Path) -> list[Record]:
    """One folder per class under the root, optionally inside ``train/``, ``val/``, ``test/``."""
    top = _subdirs(root)
    split_dirs = [d for d in top if _normalise_name(d.name) in _SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(top):
        others = [d.name for d in top if d not in split_dirs]
        raise DataError(
            f"{str(root)!r} mixes split folders {[d.name for d in split_dirs]} with other folders "
            f"{others}; fix: put every class folder inside train/, val/ or test/, or use no split folders"
        )
    groups = [(d, _SPLIT_ALIASES[_normalise_name(d.name)]) for d in split_dirs] or [(root, None)]
    records = []
    for folder, split in groups:
        for class_dir, label in _imagefolder_classes(folder):
            # Recursive like torchvision's ImageFolder: sub-folders inside a class are fine.
            records += [Record(p, label, None, split) for p in _images_in(class_dir, recursive=True)]
    return records


# --------------------------------------------------------------------------- csv

_CSV_DEFAULT_NAME = "manifest.csv"


def _csv_manifest_path(root: Path) -> Path:
    path = root / _CSV_DEFAULT_NAME if root.is_dir() else root
    if not path.is_file():
        raise DataError(
            f"CSV manifest {str(path)!r} not found; fix: set --root (or data.root) to the CSV file, or to a "
            f"folder holding {_CSV_DEFAULT_NAME} (columns: path, label[, patient_id, split])"
        )
    return path


def _csv_image_path(raw: str, base: Path) -> Path:
    """Resolve a manifest path against the CSV's folder (symlinks and ``..`` resolved)."""
    # Manifests written on Windows use backslashes; on POSIX they would be part of a name.
    raw = raw.strip().replace("\\", "/")
    return (base / raw).resolve()  # an absolute raw path replaces base


def _check_inside_root(paths: list[Path], raw: list[str], base: Path, csv_path: Path) -> None:
    """Reject rows whose path leaves the dataset root, so a manifest can't read arbitrary files."""
    bad = [f"line {_line(i)}: {raw[i]!r}" for i, p in enumerate(paths)
           if not raw[i].strip() or not p.is_relative_to(base)]
    if bad:
        raise DataError(
            f"{len(bad)} path(s) in {str(csv_path)!r} are empty or outside the dataset root "
            f"{str(base)!r}: {_examples(bad)}; fix: give paths relative to the CSV's folder, inside it"
        )


def _check_inside(paths: list[Path], raw: list[str], bases: list[Path], csv_path: Path, within: str) -> None:
    """Reject rows whose name is empty, absolute or climbs out of its folder (``bases[i]``)."""
    bad = [f"line {_line(i)}: {raw[i]!r}" for i, (p, b) in enumerate(zip(paths, bases))
           if not raw[i].strip() or not p.is_relative_to(b.resolve())]
    if bad:
        raise DataError(
            f"{len(bad)} image name(s) in {str(csv_path)!r} are empty or lead outside {within}: "
            f"{_examples(bad)}; fix: give plain file names (no '..', no absolute paths) as the "
            f"original archive has them"
        )


def _check_extensions(paths: list[Path], csv_path: Path) -> None:
    bad = [f"line {_line(i)}: {p.name!r}" for i, p in enumerate(paths)
           if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if bad:
        raise DataError(
            f"{len(bad)} path(s) in {str(csv_path)!r} are not images: {_examples(bad)}; "
            f"accepted extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )


@_source("csv", "a CSV (or a folder holding manifest.csv) with columns path, label[, patient_id, split]")
def csv_manifest(root: Path) -> list[Record]:
    """A user-written manifest: one row per image, paths relative to the CSV's folder."""
    csv_path = _csv_manifest_path(root)
    base = csv_path.parent
    df = _read_csv(csv_path)
    df.columns = [c.lower() for c in df.columns]
    _require_columns(df, ("path", "label"), csv_path)
    for column in ("patient_id", "split"):
        if column not in df.columns:
            df[column] = ""
    _check_values(df, "label", lambda v: _normalise_name(v) in LABEL_ALIASES,
                  list(LABEL_ALIASES), csv_path)
    _check_values(df, "split", lambda v: not v.strip() or _normalise_name(v) in _SPLIT_ALIASES,
                  list(_SPLIT_ALIASES) + ["(empty)"], csv_path)

    raw_paths = list(df["path"])
    paths = [_csv_image_path(p, base) for p in raw_paths]
    _check_inside_root(paths, raw_paths, base, csv_path)
    _check_extensions(paths, csv_path)
    records = [
        Record(
            path=path,
            label=LABEL_ALIASES[_normalise_name(label)],
            patient_id=pid.strip() or None,
            split=_SPLIT_ALIASES[_normalise_name(split)] if split.strip() else None,
            origin=f"{csv_path.name} line {_line(i)}",
        )
        for i, (path, label, pid, split) in enumerate(zip(paths, df["label"], df["patient_id"], df["split"]))
    ]
    _require_files(records, csv_path)
    return records
