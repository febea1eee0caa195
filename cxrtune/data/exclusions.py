"""Images kept out of training only (``data.exclude``), and the list files that name them.

A dataset holds images a model should not learn from (a tinted scan, a cropped
fragment, a blank frame), but a model is judged on the data as it comes: listed images
are removed from the train split only (with ``data.folds`` >= 2: from the training
folds), never from validation or test.

The list is a text file, one entry per line (blank lines and lines starting with ``#``
ignored), or a CSV with a ``path`` or ``file`` column. An entry is a file name, a path
relative to the data root, a full path, or a glob (``*``, ``?``, ``[...]``; ``*`` also
crosses ``/``) matched against each of those three. An entry naming an image exactly
matches that image only, so a listed ``img[1].png`` is never read as a glob.
``cxrtune data inspect --write-exclusions FILE`` writes such a list.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..atomic import replacing_file
from ..errors import DataError
from .dedupe import REMOVED, SplitChange

__all__ = ["Exclusion", "apply_exclusions", "data_base", "exclusion_digest", "match_exclusions",
           "read_exclusions", "relative_name", "write_exclusions"]

log = logging.getLogger(__name__)

_GLOB = re.compile(r"[*?\[]")
_CSV_COLUMNS = ("path", "file")
_SHOW = 10  # entries named in a warning; the rest are counted
_FIX = ("give data.exclude the path of a text file (one file name, relative path or glob per line) or "
        "a CSV with a 'path' or 'file' column, e.g. one written by `cxrtune data inspect "
        "--write-exclusions FILE`; or leave data.exclude unset")


@dataclass(frozen=True)
class Exclusion:
    """One entry of an exclusion list, and where it was read."""

    pattern: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# ------------------------------------------------------------------ reading


def read_exclusions(path: str | Path) -> tuple[Exclusion, ...]:
    """The entries of an exclusion list (a ``.csv`` by its suffix, else text)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"exclusion file {p} (data.exclude) does not exist; fix: {_FIX}")
    try:
        entries = _read_csv(p) if p.suffix.lower() == ".csv" else _read_text(p)
    except UnicodeDecodeError as exc:
        raise DataError(f"exclusion file {p} (data.exclude) is not UTF-8 text ({exc.reason}); fix: {_FIX}") from None
    if not entries:
        log.warning("exclusion file %s (data.exclude) lists no images: nothing is excluded", p)
    return entries


def _read_text(p: Path) -> tuple[Exclusion, ...]:
    out = []
    for n, raw in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        entry = raw.strip()
        if entry and not entry.startswith("#"):
            out.append(Exclusion(_normalised(entry), str(p), n))
    return tuple(out)


def _read_csv(p: Path) -> tuple[Exclusion, ...]:
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = {(c or "").strip().lower(): c for c in reader.fieldnames or ()}
        column = next((names[c] for c in _CSV_COLUMNS if c in names), None)
        if column is None:
            raise DataError(f"exclusion file {p} (data.exclude): a CSV needs a 'path' or 'file' column, "
                            f"its columns are {list(reader.fieldnames or [])}; fix: name the column of "
                            "file names 'path' (or give a .txt file with one name per line)")
        out = []
        for row in reader:
            entry = (row.get(column) or "").strip()
            if entry and not entry.startswith("#"):
                out.append(Exclusion(_normalised(entry), str(p), reader.line_num))
    return tuple(out)


def _normalised(entry: str) -> str:
    """Lists written on Windows use backslashes; ``./`` prefixes name the root itself."""
    entry = entry.replace("\\", "/")
    while entry.startswith("./"):
        entry = entry[2:]
    return entry


def exclusion_digest(path: str | Path | None) -> str:
    """A hash of the list's content, so a split made with another list is another split."""
    if path is None:
        return ""
    p = Path(path).expanduser()
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "missing"


# ------------------------------------------------------------------ matching


def data_base(root: Path) -> Path:
    """The folder names in an exclusion list are relative to: the data root (the CSV
    manifest's folder for ``source: csv``), resolved as the adapters resolve paths."""
    root = Path(root).expanduser().resolve()
    return root if root.is_dir() else root.parent


def relative_name(path: str | Path, base: Path) -> str:
    """``path`` relative to ``base`` with ``/`` separators (the full path when outside it)."""
    p = Path(path)
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.as_posix()


def match_exclusions(entries: Sequence[Exclusion], paths: Sequence[str],
                     base: Path) -> tuple[list[Exclusion | None], list[Exclusion]]:
    """For each path, the first entry matching it (or None); and the entries matching none.

    Exact names are looked up, so a long list costs one pass; only globs are tried
    against every path."""
    keys = [(relative_name(p, base), Path(p).name, Path(p).as_posix()) for p in paths]
    exact: dict[str, list[int]] = defaultdict(list)
    for i, names in enumerate(keys):
        for name in set(names):
            exact[name].append(i)
    first: list[Exclusion | None] = [None] * len(paths)
    unmatched = []
    for entry in entries:
        hits = exact.get(entry.pattern)
        if hits is None and _GLOB.search(entry.pattern):
            rx = re.compile(fnmatch.translate(entry.pattern))
            hits = [i for i, names in enumerate(keys) if any(rx.match(n) for n in names)]
        if not hits:
            unmatched.append(entry)
        for i in hits or ():
            if first[i] is None:
                first[i] = entry
    return first, unmatched


def apply_exclusions(split: pd.DataFrame, entries: Sequence[Exclusion],
                     base: Path) -> tuple[pd.DataFrame, list[SplitChange]]:
    """The split without the listed train images, and a record of each one removed.

    Listed images in val or test stay: a cleaned model is still judged on the data as
    it comes. Entries that match no image are warned about, each named."""
    df = split.reset_index(drop=True)
    first, unmatched = match_exclusions(entries, list(df["path"]), base)
    if unmatched:
        log.warning("data.exclude: %d %s no image of the task's dataset: %s%s (entries are "
                    "matched against paths relative to %s, file names and full paths)",
                    len(unmatched), "entry matches" if len(unmatched) == 1 else "entries match",
                    ", ".join(f"{e.where} {e.pattern!r}" for e in unmatched[:_SHOW]),
                    ", ..." if len(unmatched) > _SHOW else "", base)
    train = (df["split"] == "train").to_numpy()
    changes = [SplitChange(str(df.at[i, "path"]), REMOVED, "train", "", f"excluded by {e.where}", "",
                           "exclude", int(df.at[i, "fold"]), -1)
               for i, e in enumerate(first) if e is not None and train[i]]
    kept = sum(1 for i, e in enumerate(first) if e is not None and not train[i])
    log.info("data.exclude: %d train image(s) excluded from training; %d listed image(s) in val/test "
             "kept, as every image there is scored as it comes", len(changes), kept)
    gone = {c.path for c in changes}
    return df[~df["path"].isin(gone)].reset_index(drop=True), changes


# ------------------------------------------------------------------ writing


def write_exclusions(path: str | Path, items: Iterable[tuple[str, str]], about: Sequence[str] = ()) -> Path:
    """Write ``items`` ((relative path, why) pairs) as a list ``data.exclude`` reads back
    unchanged: a commented header, then each path on its own line under a comment
    saying why it was listed."""
    p = Path(path).expanduser()
    lines = ["# cxrtune exclusion list (data.exclude): these images are removed from training only;",
             "# validation and test keep them. One path per line, relative to the data root;",
             "# lines starting with # are comments. Delete the lines of images you want trained on.",
             *(f"# {a}" for a in about), ""]
    items = list(items)
    for name, why in items:
        lines += [f"# {why}", name]
    if not items:
        lines.append("# (no image was listed)")
    try:
        with replacing_file(p) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write the exclusion list {p}: {exc.strerror or exc}; fix: give a path "
                        "in a folder that exists and is writable") from None
    return p
