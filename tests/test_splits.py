import dataclasses

import pandas as pd
import pytest

from cxrtune.config import DataConfig
from cxrtune.data.labels import SCHEMES, apply_scheme
from cxrtune.data.manifest import Record
from cxrtune.data.splits import load_split, make_split, save_split
from cxrtune.errors import DataError

CLASSES = SCHEMES.get("three_class").classes


def records(n_patients=60, per_patient=3, official_test=0):
    out = []
    labels = ["normal", "bacterial", "viral"]
    for p in range(n_patients):
        for k in range(per_patient):
            # Mixed labels per patient, as in Kermany (bacterial and viral for one person).
            label = labels[(p + (k if p % 5 == 0 else 0)) % 3]
            split = "test" if p < official_test else "train"
            out.append(Record(path=f"/d/p{p}_{k}.png", label=label, patient_id=f"person{p}",
                              split=split if official_test else None))
    return out


def split_of(recs, **cfg):
    scheme = SCHEMES.get("three_class")
    return make_split(apply_scheme(recs, scheme), DataConfig(task="three_class", **cfg), scheme.classes)


def test_no_patient_in_two_splits_and_all_classes_present():
    df = split_of(records())
    assert (df.groupby("group")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    for s in ("train", "val", "test"):
        assert set(df.loc[df.split == s, "target"]) == set(CLASSES)


def test_deterministic_by_seed():
    a, b = split_of(records(), split_seed=3), split_of(records(), split_seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = split_of(records(), split_seed=4)
    assert not a["split"].equals(c["split"])


def test_official_test_is_kept_and_leaking_patients_dropped():
    recs = records(official_test=15)
    # a test patient that also has a train image must not stay in train
    recs.append(Record(path="/d/leak.png", label="normal", patient_id="person0", split="train"))
    df = split_of(recs)
    assert set(df.loc[df.split == "test", "group"]) == {f"person{p}" for p in range(15)}
    assert "/d/leak.png" not in set(df["path"])


def test_official_test_missing_a_class_asks_for_resplit():
    recs = records(official_test=15)
    recs = [dataclasses.replace(r, label="normal") if r.split == "test" else r for r in recs]
    with pytest.raises(DataError, match="resplit_test: true"):
        split_of(recs)
    df = split_of(recs, resplit_test=True)
    assert set(df.loc[df.split == "test", "target"]) == set(CLASSES)


def test_kfold_assigns_every_trainval_row_a_fold():
    df = split_of(records(), folds=4, fold=2)
    pool = df[df.split != "test"]
    assert sorted(pool["fold"].unique()) == [0, 1, 2, 3]
    assert (pool.loc[pool.split == "val", "fold"] == 2).all()
    assert (pool.groupby("group")["fold"].nunique() == 1).all()


def test_save_and_load_roundtrip(tmp_path):
    df = split_of(records())
    p = save_split(df, tmp_path / "s" / "split.csv")
    back = load_split(p)
    assert list(back["path"]) == list(df["path"]) and list(back["split"]) == list(df["split"])
    assert not list((tmp_path / "s").glob(".*tmp"))


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(DataError, match="cannot split"):
        split_of(records(n_patients=4, per_patient=3))


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_fractions_are_honoured_within_one_patient(fraction):
    recs = records(n_patients=90, per_patient=3)
    largest = 3 + 1e-9  # images of the largest patient group
    df = split_of(recs, val_fraction=fraction, test_fraction=fraction, resplit_test=True)
    assert (df.groupby("group")["split"].nunique() == 1).all()
    n_test = (df.split == "test").sum()
    assert abs(n_test / len(df) - fraction) <= largest / len(df)
    pool = df[df.split != "test"]
    assert abs((pool.split == "val").sum() / len(pool) - fraction) <= largest / len(pool)
    for s in ("train", "val", "test"):  # still stratified
        assert set(df.loc[df.split == s, "target"]) == set(CLASSES)
    again = split_of(recs, val_fraction=fraction, test_fraction=fraction, resplit_test=True)
    pd.testing.assert_frame_equal(df, again)


def test_file_name_case_numbers_group_images_without_patient_id():
    recs = []
    for case in range(30):
        label = ("normal", "bacterial", "viral")[case % 3]
        for k in "abcd":
            recs.append(Record(path=f"/d/covid-19-pneumonia-case-{case}-{k}.jpg", label=label))
    df = split_of(recs, resplit_test=True)
    assert df["group"].nunique() == 30
    assert (df.groupby("group")["split"].nunique() == 1).all()


def test_fold_error_suggests_fewer_folds_not_fractions():
    with pytest.raises(DataError) as e:
        split_of(records(n_patients=20), folds=30)
    msg = str(e.value)
    assert "30 folds" in msg and "data.folds" in msg and "fraction" not in msg
