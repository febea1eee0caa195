"""data.dedupe on real files: planted near-duplicates across and within splits, resolved per mode."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import pandas as pd
import pytest

from cxrtune.config import DataConfig, from_dict
from cxrtune.data.dedupe import DedupeContext, apply_dedupe
from cxrtune.data.pipeline import prepare_data
from cxrtune.errors import ConfigError
from image_files import patients_manifest

def _near_copy(src: Path, dst: Path) -> None:
    """Re-exported at another size and as a JPEG: a near, never an exact, duplicate."""
    img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(dst), cv2.resize(img, None, fx=1.5, fy=1.5), [cv2.IMWRITE_JPEG_QUALITY, 85])


def _dataset(root: Path) -> dict[str, list[str]]:
    """A CSV manifest: 12 patients per class, 2 images each, patients 0-2 in the official
    test split. Planted near-duplicates (the planted groups, by file name, are returned):

    - ``test_copy``: an official test image copied into train under another patient;
    - ``pool0..pool3``: a train image copied twice, each copy filed as a new patient, so the
      drawn train/val split scatters the copies;
    - ``same_patient``: a copy filed under the original's own patient (always one split).
    """
    rows = patients_manifest(root, patients=12, test_patients=3)
    (root / "plant").mkdir()
    groups = {"test_copy": ["img/normal_0_0.png", "plant/test-copy.jpg"]}
    _near_copy(root / "img/normal_0_0.png", root / "plant/test-copy.jpg")
    rows.append("plant/test-copy.jpg,normal,x-test,train")
    for k, (label, p) in enumerate([("bacterial", 5), ("normal", 7), ("viral", 9), ("bacterial", 11)]):
        original = f"img/{label}_{p}_0.png"
        groups[f"pool{k}"] = [original]
        for copy in "ab":
            name = f"plant/pool{k}-{copy}.jpg"
            _near_copy(root / original, root / name)
            rows.append(f"{name},{label},x{k}{copy},train")
            groups[f"pool{k}"].append(name)
    _near_copy(root / "img/viral_6_0.png", root / "plant/same-patient.jpg")
    rows.append("plant/same-patient.jpg,viral,v6,train")
    groups["same_patient"] = ["img/viral_6_0.png", "plant/same-patient.jpg"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return groups


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("dedupe")
    root = base / "data"
    groups = _dataset(root)

    def prepare(**cfg):
        data = prepare_data(DataConfig(source="csv", root=str(root), image_size=32, workers=1,
                                       cache_dir=str(base / "cache"), **cfg), progress=False)
        by_name = data.split.assign(name=[str(Path(p).relative_to(root)) for p in data.split["path"]])
        return data, by_name.set_index("name")

    return root, groups, prepare


def _splits_of(split: pd.DataFrame, names: list[str]) -> set[str]:
    return {split.at[n, "split"] for n in names if n in split.index}


def _official_test(root: Path) -> set[str]:
    manifest = pd.read_csv(root / "manifest.csv")
    return set(manifest.loc[manifest["split"] == "test", "path"])


def test_off_leaves_planted_duplicates_spanning_splits(planted):
    root, groups, prepare = planted
    data, split = prepare(dedupe="off")
    assert _splits_of(split, groups["test_copy"]) == {"train", "test"} or \
        _splits_of(split, groups["test_copy"]) == {"val", "test"}
    assert any(len(_splits_of(split, groups[f"pool{k}"])) > 1 for k in range(4))  # the drawn split scatters them
    assert data.removed == () and data.removed_path is None


def test_across_splits_keeps_each_group_in_one_split(planted):
    root, groups, prepare = planted
    data, split = prepare()  # the default
    assert data.cfg.dedupe == "across_splits"
    for name, members in groups.items():
        assert len(_splits_of(split, members)) == 1, name
    # The official test split stays as published; its copy in train is removed, not moved.
    assert set(split.index[split["split"] == "test"]) == _official_test(root)
    assert "plant/test-copy.jpg" not in split.index
    removed = {str(Path(c.path).relative_to(root)): c for c in data.removed}
    assert removed["plant/test-copy.jpg"].action == "removed"
    assert "official test image" in removed["plant/test-copy.jpg"].reason
    # Copies inside one split are kept; the scattered pools are moved whole, never dropped.
    assert set(groups["same_patient"]) <= set(split.index)
    for k in range(4):
        assert set(groups[f"pool{k}"]) <= set(split.index)
    moved = [c for c in data.removed if c.action == "moved"]
    assert moved and all(c.from_split != c.to_split and c.group.startswith("dup-") for c in moved)
    for c in moved:  # the whole patient moves with its image (bacterial_5_1.png with bacterial_5_0.png)
        patient = split.loc[str(Path(c.path).relative_to(root)), "group"]
        assert split.loc[split["group"] == patient, "split"].nunique() == 1
    assert data.change_counts()["moved"] == len(moved)


def test_the_rule_is_deterministic_and_the_removed_csv_lists_every_change(planted):
    root, groups, prepare = planted
    a, split_a = prepare(dedupe="all")
    b, split_b = prepare(dedupe="all")
    pd.testing.assert_frame_equal(a.split, b.split)
    assert a.removed == b.removed and a.split_path == b.split_path
    assert a.removed_path == a.split_path.with_name(a.split_path.stem + "-removed.csv")
    csv = pd.read_csv(a.removed_path, keep_default_na=False)
    assert list(csv["path"]) == [c.path for c in a.removed]
    assert list(csv["action"]) == [c.action for c in a.removed]
    assert set(csv.columns) >= {"path", "action", "from_split", "to_split", "reason", "group"}
    # A different mode is a different split file: a stale one is never reused.
    c, _ = prepare(dedupe="across_splits")
    assert c.split_path != a.split_path


def test_all_keeps_one_image_per_group(planted):
    root, groups, prepare = planted
    data, split = prepare(dedupe="all")
    for name, members in groups.items():
        kept = [m for m in members if m in split.index]
        assert len(kept) == 1, (name, kept)
    assert "img/normal_0_0.png" in split.index  # the official test copy is the one kept
    # The first path of each group in sorted order is the one kept (here: the originals).
    for k in range(4):
        assert groups[f"pool{k}"][0] in split.index
    assert set(split.index[split["split"] == "test"]) == _official_test(root)
    reasons = {str(Path(c.path).relative_to(root)): c.reason for c in data.removed}
    assert "keeps one image per group" in reasons["plant/same-patient.jpg"]


def test_within_split_removes_copies_in_one_split_and_warns_about_the_rest(planted, caplog):
    root, groups, prepare = planted
    with caplog.at_level(logging.WARNING):
        data, split = prepare(dedupe="within_split")
    assert "plant/same-patient.jpg" not in split.index and "img/viral_6_0.png" in split.index
    for name, members in groups.items():
        present = split.loc[[m for m in members if m in split.index]]
        assert present["split"].is_unique, name  # at most one copy per split
    assert "plant/test-copy.jpg" in split.index  # spans train/test: left, with a warning
    assert "span two splits" in caplog.text and "across_splits" in caplog.text
    assert all(c.action == "removed" for c in data.removed)


def test_folds_keep_each_group_in_one_fold_and_agree_between_folds(planted):
    root, groups, prepare = planted
    folds = [prepare(folds=3, fold=k)[1] for k in range(3)]
    for split in folds:
        pool = split[split["split"] != "test"]
        for name, members in groups.items():
            assert pool.loc[[m for m in members if m in pool.index], "fold"].nunique() <= 1, name
    # Resolved by fold, not by train/val: every fold's run sees the same assignment.
    for split in folds[1:]:
        pd.testing.assert_series_equal(split["fold"].sort_index(), folds[0]["fold"].sort_index())
    for k, split in enumerate(folds):
        pool = split[split["split"] != "test"]
        assert ((pool["fold"] == k) == (pool["split"] == "val")).all()


def _frame(rows):
    return pd.DataFrame([{"path": p, "label": "normal", "target": "normal", "patient_id": g, "group": g,
                          "split": s, "fold": f} for p, g, s, f in rows])


def test_rule_majority_then_test_then_val_then_train():
    df = _frame([("/a1", "A", "train", -1), ("/a2", "B", "train", -1), ("/a3", "C", "val", -1),
                 ("/b1", "D", "train", -1), ("/b2", "E", "val", -1),
                 ("/c1", "F", "val", -1), ("/c2", "G", "test", -1)])
    out, changes = apply_dedupe(df, [[0, 1, 2], [3, 4], [5, 6]], "across_splits", DedupeContext(False))
    where = dict(zip(out["path"], out["split"]))
    assert where["/a3"] == "train"  # the majority
    assert where["/b1"] == "val"  # a tie: val before train
    assert where["/c1"] == "test"  # a tie: test before val (a drawn test split)
    assert {c.path for c in changes} == {"/a3", "/b1", "/c1"}
    # With the official test split, test wins and the copies elsewhere are removed.
    out, changes = apply_dedupe(df, [[5, 6]], "across_splits", DedupeContext(True))
    assert "/c1" not in set(out["path"]) and changes[0].action == "removed"


def test_a_patient_moves_whole_with_its_duplicate():
    df = _frame([("/p1", "P", "train", -1), ("/p2", "P", "train", -1), ("/q1", "Q", "val", -1),
                 ("/q2", "Q", "val", -1), ("/q3", "Q", "val", -1)])
    out, changes = apply_dedupe(df, [[0, 2]], "across_splits", DedupeContext(False))
    assert set(out["split"]) == {"val"}  # Q holds more of the unit
    why = {c.path: c.reason for c in changes}
    assert set(why) == {"/p1", "/p2"} and why["/p2"].startswith("same patient/group")


def test_folds_tie_goes_to_the_lowest_fold():
    df = _frame([("/a", "A", "train", 2), ("/b", "B", "val", 1), ("/c", "C", "train", 0),
                 ("/d", "D", "train", 0)])
    out, _ = apply_dedupe(df, [[0, 1]], "across_splits", DedupeContext(False, folds=3, fold=1))
    moved = out.set_index("path")
    assert moved.at["/a", "fold"] == 1 and moved.at["/a", "split"] == "val"


def test_dedupe_config_is_validated_with_the_fix():
    with pytest.raises(ConfigError) as e:
        from_dict(DataConfig, {"dedupe": "everywhere"}, "data").validate()
    assert "data.dedupe='everywhere'" in str(e.value)
    assert "off, within_split, across_splits, all" in str(e.value)
