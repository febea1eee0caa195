"""What happens to near-duplicate images once the split is drawn (``data.dedupe``).

The same radiograph filed twice (re-exported, resized, listed under two patients) in
two splits inflates every validation and test score. ``prepare_data`` finds the
near-duplicate groups (``duplicates.py``) among the images of the drawn split and
resolves them here, by mode (``DEDUPE_MODES``):

- ``off``: nothing changes (groups may span splits; ``data inspect`` reports them).
- ``within_split``: one image of each group is kept per split, its copies in the same
  split are removed; groups spanning splits are left as they are, with a warning.
- ``across_splits`` (default): a group spanning splits is put wholly into one split,
  together with every image of the patients it touches (so no patient is split
  either). The rule, in order:

  1. when the test split is the source's official one and the group holds an official
     test image, test wins, and the group's images elsewhere are *removed* (not moved):
     the official test split stays exactly as published, comparable with the papers
     quoting it, as ``splits.draw_split`` already does for patients found in both;
  2. else the split holding most of the group's images wins; ties go to test, then
     val, then train (the scarcer held-out splits keep their images);
  with ``data.folds`` >= 2 the train+val pool is resolved per fold instead (the fold
  holding most wins, ties to the lowest fold number), so a group never spans two
  folds and every fold of one cross-validation sees the same assignment.
  Copies inside one split are kept.
- ``all``: ``across_splits``, then only the first image (by path) of each group is kept.

Every image removed or moved is a :class:`SplitChange`; ``save_changes`` writes them
as a CSV beside the split file. This module needs no image library: it works on the
split table and groups of its row positions.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from ..atomic import replacing_file
from ..registry import Registry

__all__ = ["CHANGE_COLUMNS", "DEDUPE_MODES", "DEDUPE_MODE_NAMES", "DedupeContext", "SplitChange",
           "apply_dedupe", "change_counts", "changes_path", "merge_linked", "save_changes"]

log = logging.getLogger(__name__)

# In the order the documentation gives them; DEDUPE_MODES.names() is alphabetical.
DEDUPE_MODE_NAMES = ("off", "within_split", "across_splits", "all")
REMOVED, MOVED = "removed", "moved"
_PRIORITY = {"test": 0, "val": 1, "train": 2}  # ties between splits: held-out splits keep their images


@dataclass(frozen=True)
class SplitChange:
    """One image removed from the split, or moved to another split, and why."""

    path: str
    action: str  # "removed" | "moved"
    from_split: str
    to_split: str  # "" when removed
    reason: str
    group: str = ""  # the near-duplicate group ("dup-3"); "" for other causes
    cause: str = "dedupe"  # "dedupe" | "exclude" | "split" (patient also in the official test)
    from_fold: int = -1  # with data.folds >= 2
    to_fold: int = -1


CHANGE_COLUMNS = tuple(f.name for f in fields(SplitChange))


@dataclass(frozen=True)
class DedupeContext:
    """What the resolution needs to know of the split beyond its table."""

    official_test: bool  # the test split is the source's own: kept as published
    folds: int = 0  # data.folds: >= 2 resolves the train+val pool per fold
    fold: int = 0  # the validation fold


Resolver = Callable[[pd.DataFrame, list[list[int]], list[str], DedupeContext], list[SplitChange]]
DEDUPE_MODES: Registry[Resolver] = Registry("dedupe mode", names=DEDUPE_MODE_NAMES)


def apply_dedupe(split: pd.DataFrame, clusters: Iterable[Iterable[int]], mode: str,
                 ctx: DedupeContext) -> tuple[pd.DataFrame, list[SplitChange]]:
    """The split with near-duplicate groups resolved by ``mode``, and what changed.

    ``clusters``: groups of row positions of ``split`` (``duplicates.duplicate_groups``).
    The result has the removed rows dropped and the moved rows' split (and fold) changed.
    """
    df = split.reset_index(drop=True).copy()
    paths = df["path"].to_numpy(dtype=object)
    ordered = sorted((sorted(c, key=lambda i: paths[i]) for c in clusters), key=lambda c: paths[c[0]])
    ids = [f"dup-{k + 1}" for k in range(len(ordered))]
    changes = DEDUPE_MODES.get(mode, where="data.dedupe")(df, ordered, ids, ctx)
    gone = {c.path for c in changes if c.action == REMOVED}
    df = df[~df["path"].isin(gone)].reset_index(drop=True)
    if mode in ("across_splits", "all"):
        _check_one_place(df, [[paths[i] for i in c] for c in ordered], ctx)
    _log_summary(mode, ordered, changes)
    return df, changes


# ------------------------------------------------------------------ places and units


def _places(df: pd.DataFrame, ctx: DedupeContext) -> list[str]:
    """Where each row sits: its split, or with folds its fold inside the train+val pool."""
    if ctx.folds < 2:
        return list(df["split"])
    return [s if s == "test" else f"fold{int(f)}" for s, f in zip(df["split"], df["fold"])]


def _priority(place: str) -> tuple[int, int]:
    if place.startswith("fold"):
        return (3, int(place[4:]))
    return (_PRIORITY[place], 0)


def _move_to(df: pd.DataFrame, i: int, place: str, ctx: DedupeContext) -> None:
    if place.startswith("fold"):
        fold = int(place[4:])
        df.at[i, "fold"] = fold
        df.at[i, "split"] = "val" if fold == ctx.fold else "train"
    else:
        df.at[i, "split"] = place
        df.at[i, "fold"] = -1


def merge_linked(keys: Sequence[str], links: Iterable[Iterable[int]]) -> list[str]:
    """Each key's merged key: keys of the items in one link (indices into ``keys``) become
    one, named by the smallest key in it (deterministic), transitively."""
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for link in links:
        roots = sorted({find(keys[i]) for i in link})
        for other in roots[1:]:
            parent[other] = roots[0]
    return [find(k) for k in keys]


def _units(df: pd.DataFrame, clusters: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """(rows, clusters) of each set of patient groups linked by near-duplicates: moving a
    duplicate alone would split its patient, so a whole unit moves."""
    roots = merge_linked([str(g) for g in df["group"]], clusters)
    members: dict[str, list[int]] = defaultdict(list)
    for k, c in enumerate(clusters):
        members[roots[c[0]]].append(k)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, root in enumerate(roots):
        if root in members:
            rows[root].append(i)
    return [(rows[root], members[root]) for root in sorted(members, key=lambda r: members[r][0])]


# ------------------------------------------------------------------ the modes


def _change(df: pd.DataFrame, i: int, action: str, reason: str, group: str) -> SplitChange:
    """Row ``i`` leaving where it is now (a move fills in its destination after moving it)."""
    return SplitChange(str(df.at[i, "path"]), action, str(df.at[i, "split"]), "", reason, group,
                       "dedupe", int(df.at[i, "fold"]), -1)


@DEDUPE_MODES.register("off")
def _off(df: pd.DataFrame, clusters: list[list[int]], ids: list[str], ctx: DedupeContext) -> list[SplitChange]:
    return []


@DEDUPE_MODES.register("within_split")
def _within_split(df: pd.DataFrame, clusters: list[list[int]], ids: list[str],
                  ctx: DedupeContext) -> list[SplitChange]:
    places = _places(df, ctx)
    changes: list[SplitChange] = []
    spanning = []
    for c, gid in zip(clusters, ids):
        by_place: dict[str, list[int]] = defaultdict(list)
        for i in c:  # clusters are in path order: the first of each place is kept
            by_place[places[i]].append(i)
        if len(by_place) > 1:
            spanning.append(gid)
        for keep, *copies in by_place.values():
            changes += [_change(df, i, REMOVED, f"near-duplicate of {df.at[keep, 'path']} in the same "
                                "split (data.dedupe=within_split keeps one per split)", gid)
                        for i in copies]
    if spanning:
        log.warning("%d near-duplicate group(s) span two splits and are left so under "
                    "data.dedupe=within_split (%s): their images leak between splits; set "
                    "data.dedupe: across_splits (the default) to keep each group in one split",
                    len(spanning), ", ".join(spanning[:5]) + (", ..." if len(spanning) > 5 else ""))
    return changes


@DEDUPE_MODES.register("across_splits")
def _across_splits(df: pd.DataFrame, clusters: list[list[int]], ids: list[str],
                   ctx: DedupeContext) -> list[SplitChange]:
    places = _places(df, ctx)
    changes: list[SplitChange] = []
    for rows, members in _units(df, clusters):
        held = Counter(places[i] for i in rows)
        if len(held) < 2:
            continue
        gid = ids[members[0]]
        dups = {i for k in members for i in clusters[k]}
        if ctx.official_test and "test" in held:
            example = next((df.at[i, "path"] for k in members for i in clusters[k] if places[i] == "test"),
                           "(through a shared patient)")
            why = (f"near-duplicate group {gid} holds official test image {example}; the official test "
                   "split is kept as published, so the group's images leave the other splits")
            changes += [_change(df, i, REMOVED, _why(why, i, dups), gid) for i in rows if places[i] != "test"]
            continue
        target = min(held, key=lambda p: (-held[p], _priority(p)))
        why = (f"near-duplicate group {gid} spanned {', '.join(sorted(held, key=_priority))}; moved whole "
               f"to {target}, which held {held[target]} of its {len(rows)} image(s) (ties: test > val > "
               "train, then the lowest fold)")
        for i in rows:
            if places[i] != target:
                before = _change(df, i, MOVED, _why(why, i, dups), gid)
                _move_to(df, i, target, ctx)
                changes.append(replace(before, to_split=str(df.at[i, "split"]), to_fold=int(df.at[i, "fold"])))
    return changes


def _why(reason: str, i: int, dups: set[int]) -> str:
    return reason if i in dups else f"same patient/group as an image of this group: {reason}"


@DEDUPE_MODES.register("all")
def _keep_one(df: pd.DataFrame, clusters: list[list[int]], ids: list[str],
              ctx: DedupeContext) -> list[SplitChange]:
    moved = {c.path: c for c in _across_splits(df, clusters, ids, ctx)}
    gone = {p for p, c in moved.items() if c.action == REMOVED}
    for c, gid in zip(clusters, ids):
        left = [i for i in c if df.at[i, "path"] not in gone]
        for i in left[1:]:  # clusters are in path order: the first is kept
            removal = _change(df, i, REMOVED, f"near-duplicate of {df.at[left[0], 'path']} "
                              "(data.dedupe=all keeps one image per group)", gid)
            earlier = moved.get(removal.path)  # moved, then removed: one record, from where it was
            if earlier is not None:
                removal = replace(removal, from_split=earlier.from_split, from_fold=earlier.from_fold)
            moved[removal.path] = removal
    return list(moved.values())


# ------------------------------------------------------------------ checks, records


def _check_one_place(df: pd.DataFrame, clusters: list[list[str]], ctx: DedupeContext) -> None:
    """The invariant this module exists for: after across_splits / all, no near-duplicate
    group and no patient spans two splits (or folds)."""
    place = dict(zip(df["path"], _places(df, ctx)))
    for c in clusters:
        if len({place[p] for p in c if p in place}) > 1:
            raise AssertionError(f"internal: near-duplicate group {c} still spans splits")
    by_group = pd.Series(_places(df, ctx)).groupby(df["group"].to_numpy()).nunique()
    if (by_group > 1).any():
        raise AssertionError("internal: a patient landed in two splits")


def _log_summary(mode: str, clusters: list[list[int]], changes: Sequence[SplitChange]) -> None:
    n = Counter(c.action for c in changes)
    # debug: prepare_data warns about what changed, and inspect only plans
    log.debug("data.dedupe=%s: %d near-duplicate group(s) of %d images; %d image(s) moved, %d removed",
             mode, len(clusters), sum(map(len, clusters)), n[MOVED], n[REMOVED])


def changes_path(split_path: Path) -> Path:
    """Where the changes of the split file ``split_path`` are recorded."""
    return split_path.with_name(f"{split_path.stem}-removed.csv")


def save_changes(changes: Sequence[SplitChange], split_path: Path) -> Path | None:
    """Write ``changes`` beside the split file (atomically); None, and no file, when there
    are none (a file left by an earlier run of the same split is removed)."""
    path = changes_path(split_path)
    if not changes:
        path.unlink(missing_ok=True)
        return None
    frame = pd.DataFrame([astuple(c) for c in changes], columns=list(CHANGE_COLUMNS))
    with replacing_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def change_counts(changes: Iterable[SplitChange]) -> dict[str, int]:
    """Counts for a run's parameters: images moved and removed by dedupe, excluded from
    training, and dropped by the split (patients of the official test found elsewhere)."""
    changes = list(changes)
    return {
        "moved": sum(c.action == MOVED for c in changes),
        "removed_duplicates": sum(c.action == REMOVED and c.cause == "dedupe" for c in changes),
        "excluded": sum(c.cause == "exclude" for c in changes),
        "dropped_by_split": sum(c.cause == "split" for c in changes),
    }
