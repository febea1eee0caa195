"""data.exclude and `data inspect --write-exclusions` on real files: listed images leave
training only; images that look off are found, written and read back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxrtune.cli import app
from cxrtune.config import DataConfig, from_dict
from cxrtune.data.exclusions import read_exclusions
from cxrtune.data.pipeline import prepare_data
from cxrtune.errors import ConfigError, DataError
from image_files import patients_manifest, radiograph

# Planted images that look off (relative paths), and grey images stored as colour files,
# which must not be reported.
TINTED = ("odd/tinted-sepia.png", "odd/tinted-green.jpg")
STRIP = "odd/strip.png"
BLANK = "odd/blank.png"
GREY_AS_COLOUR = ("odd/grey-rgb.png", "odd/grey-rgb.jpg")


def _plant_odd(root: Path) -> list[str]:
    """Manifest rows of the planted images; tinted-green.jpg is in the official test split."""
    (root / "odd").mkdir()
    grey = radiograph(1001).astype(np.float32)
    sepia = np.stack([grey * 0.55, grey * 0.8, grey], axis=-1)  # OpenCV writes BGR: a warm cast
    cv2.imwrite(str(root / TINTED[0]), sepia.astype(np.uint8))
    grey = radiograph(1006).astype(np.float32)  # another radiograph: not a near-duplicate of the first
    green = np.stack([grey * 0.7, grey, grey * 0.7], axis=-1)
    cv2.imwrite(str(root / TINTED[1]), green.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(str(root / STRIP), radiograph(1002, (40, 120)))  # 120 x 40 px: width/height 3
    blank = 200 + np.random.default_rng(1003).normal(0, 1, (64, 64))
    cv2.imwrite(str(root / BLANK), np.clip(blank, 0, 255).astype(np.uint8))
    for k, name in enumerate(GREY_AS_COLOUR):
        g = radiograph(1004 + k)
        cv2.imwrite(str(root / name), cv2.cvtColor(g, cv2.COLOR_GRAY2BGR))
    rows = [f"{TINTED[0]},normal,o1,train", f"{TINTED[1]},bacterial,o2,test", f"{STRIP},viral,o3,train",
            f"{BLANK},normal,o4,train"]
    return rows + [f"{n},bacterial,o{5 + k},train" for k, n in enumerate(GREY_AS_COLOUR)]


def _dataset(root: Path, odd: bool = True) -> Path:
    """10 patients per class, 2 images each; patients 0-1 in the official test split."""
    rows = patients_manifest(root, patients=10, test_patients=2)
    if odd:
        rows += _plant_odd(root)
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("exclusions")
    root = _dataset(base / "data")

    def prepare(**cfg):
        data = prepare_data(DataConfig(source="csv", root=str(root), image_size=32, workers=1,
                                       cache_dir=str(base / "cache"), **cfg), progress=False)
        named = data.split.assign(name=[Path(p).relative_to(root).as_posix() for p in data.split["path"]])
        return data, named.set_index("name")

    return base, root, prepare


def _names(split: pd.DataFrame, part: str) -> set[str]:
    return set(split.index[split["split"] == part])


def test_listed_images_leave_train_only(dataset, caplog):
    base, root, prepare = dataset
    _, before = prepare()
    train, val, test = (sorted(_names(before, s)) for s in ("train", "val", "test"))
    first = next(n for n in train if n.startswith("img/normal_"))
    listed = base / "exclude.txt"
    listed.write_text("\n".join([
        "# images we do not want to learn from",
        first,  # line 2: a relative path
        "",
        Path(val[0]).name,  # line 4: a bare file name, of a val image
        "img/bacterial_[2-4]_*.png",  # line 5: a glob
        test[0],  # line 6: a test image
        "nothing-matches-*.png",  # line 7
    ]) + "\n")
    with caplog.at_level(logging.WARNING):
        data, after = prepare(exclude=str(listed))
    assert "nothing-matches-*.png" in caplog.text and f"{listed}:7" in caplog.text
    # val and test are exactly what they were: a cleaned model is judged on the data as it comes
    assert _names(after, "val") == set(val) and _names(after, "test") == set(test)
    globbed = {n for n in train if n.startswith(("img/bacterial_2_", "img/bacterial_3_", "img/bacterial_4_"))}
    assert globbed and set(train) - _names(after, "train") == {first} | globbed
    why = {Path(c.path).relative_to(root).as_posix(): c for c in data.removed if c.cause == "exclude"}
    assert set(why) == {first} | globbed
    assert why[first].reason == f"excluded by {listed}:2" and why[first].from_split == "train"
    assert all(why[n].reason == f"excluded by {listed}:5" for n in globbed)
    assert data.change_counts()["excluded"] == len(why)
    assert data.removed_path is not None and len(pd.read_csv(data.removed_path)) == len(data.removed)
    # Another list is another split file.
    listed.write_text(train[1] + "\n")
    other, _ = prepare(exclude=str(listed))
    assert other.split_path != data.split_path


def test_a_csv_list_with_a_path_or_file_column(dataset):
    base, root, prepare = dataset
    _, before = prepare()
    train = sorted(_names(before, "train"))
    for column in ("path", "file"):
        listed = base / f"exclude-{column}.csv"
        listed.write_text(f"{column},why\n{train[0]},tinted\n{Path(train[1]).name},cropped\n")
        data, after = prepare(exclude=str(listed))
        assert set(train) - _names(after, "train") == set(train[:2])
        assert sorted(c.reason for c in data.removed) == [f"excluded by {listed}:2", f"excluded by {listed}:3"]
    bad = base / "bad.csv"
    bad.write_text("name,why\nx.png,tinted\n")
    with pytest.raises(DataError, match=r"bad\.csv.*needs a 'path' or 'file' column.*\['name', 'why'\]"):
        read_exclusions(bad)


def test_a_missing_list_is_a_clear_error(dataset, tmp_path):
    base, root, prepare = dataset
    missing = tmp_path / "nowhere" / "exclude.txt"
    with pytest.raises(ConfigError) as e:
        prepare(exclude=str(missing))
    assert f"data.exclude={str(missing)!r}" in str(e.value) and "does not exist" in str(e.value)
    assert "--write-exclusions" in str(e.value)
    with pytest.raises(ConfigError, match="data.exclude"):  # as a --set data.exclude=... reaches it
        from_dict(DataConfig, {"exclude": str(missing)}, "data").validate()


def test_with_folds_the_validation_fold_keeps_listed_images(dataset):
    base, root, prepare = dataset
    _, before = prepare(folds=3, fold=1)
    pool = before[before["split"] != "test"]
    listed = base / "exclude-folds.txt"
    listed.write_text("img/*_1.png\n")  # the second image of every patient
    data, after = prepare(folds=3, fold=1, exclude=str(listed))
    assert _names(after, "val") == _names(before, "val")  # fold 1 kept whole
    assert _names(after, "test") == _names(before, "test")
    assert not any(n.endswith("_1.png") for n in _names(after, "train"))
    assert len(data.removed) == sum(n.endswith("_1.png") for n in _names(before, "train"))
    assert {c.from_fold for c in data.removed} == set(pool.loc[pool["split"] == "train", "fold"])


def test_excluding_every_train_image_of_a_class_names_the_fix(dataset):
    base, root, prepare = dataset
    listed = base / "exclude-viral.txt"
    listed.write_text("img/viral_*\nodd/strip.png\n")
    with pytest.raises(DataError) as e:
        prepare(exclude=str(listed))
    assert "the train split has no viral images left after data.exclude removed" in str(e.value)
    assert f"list fewer images in {listed}" in str(e.value)


# ------------------------------------------------------------------ inspect -> list -> data.exclude


def test_inspect_reports_images_that_look_off_and_writes_a_list_data_exclude_reads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXRTUNE_HOME", str(tmp_path / "home"))
    root = _dataset(tmp_path / "data")
    listed = tmp_path / "lists" / "looks-off.txt"
    listed.parent.mkdir()
    result = CliRunner().invoke(app, ["data", "inspect", "--source", "csv", "--root", str(root), "--image-size",
                                      "32", "--json", "--write-exclusions", str(listed)])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    off = r["looks_off"]
    assert sorted(i["name"] for i in off["tinted"]) == sorted(TINTED)  # grey stored as RGB is not tinted
    assert all(i["channel_difference"] > r["looks_off_thresholds"]["tint_levels"] for i in off["tinted"])
    assert [i["name"] for i in off["extreme_aspect"]] == [STRIP] and off["extreme_aspect"][0]["aspect"] == 3.0
    assert [i["name"] for i in off["near_blank"]] == [BLANK]
    assert r["exclusions_file"] == str(listed)
    # The list: a commented header, then each path under a comment saying why.
    lines = listed.read_text().splitlines()
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    assert entries == sorted([*TINTED, STRIP, BLANK])
    for name, why in (("odd/strip.png", "extreme aspect ratio: 120x40 px"), (BLANK, "near-blank"),
                      (TINTED[0], "tinted")):
        assert why in lines[lines.index(name) - 1]
    assert "training only" in lines[0]
    # ... read back unchanged by data.exclude: the train ones leave training, the test one stays.
    with caplog.at_level(logging.WARNING):
        data = prepare_data(DataConfig(source="csv", root=str(root), image_size=32, workers=1,
                                       exclude=str(listed)), progress=False)
    assert "match no image" not in caplog.text
    names = {Path(p).relative_to(root).as_posix(): s for p, s in zip(data.split["path"], data.split["split"])}
    assert names[TINTED[1]] == "test"
    excluded = {Path(c.path).relative_to(root).as_posix() for c in data.removed if c.cause == "exclude"}
    assert excluded and excluded <= {TINTED[0], STRIP, BLANK}
    assert all(names.get(n, "train") in ("val", "test") for n in {TINTED[0], STRIP, BLANK} - excluded)
