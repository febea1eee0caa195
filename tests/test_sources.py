"""Source adapters, each run on tiny files written in that source's real layout."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrtune.data.sources import SOURCES, load_records
from cxrtune.errors import ConfigError, DataError

_PIXELS = np.zeros((8, 8), dtype=np.uint8)


def _img(path: Path) -> Path:
    """Write an 8x8 image (format from the suffix; cv2 cannot write .dcm, so touch those)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
        assert cv2.imwrite(str(path.with_suffix(path.suffix.lower())), _PIXELS)
        if path.suffix != path.suffix.lower():
            path.with_suffix(path.suffix.lower()).rename(path)
    else:
        path.write_bytes(b"\0")
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _by_name(records):
    return {r.path.name: r for r in records}


def test_registered_sources():
    assert SOURCES.names() == ["coronahack", "covid_radiography", "csv", "curated", "imagefolder", "kermany"]


def test_unknown_source_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown source 'nih'.*coronahack, covid_radiography, csv, curated"):
        load_records("nih", tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*fix"):
        load_records("kermany", tmp_path / "nowhere")


@pytest.mark.parametrize("source, layout", [
    ("kermany", "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}"),
    ("covid_radiography", "COVID-19_Radiography_Dataset"),
    ("curated", "Pneumonia-Bacterial"),
    ("imagefolder", "<class>"),
])
def test_no_images_names_root_and_layout(tmp_path, source, layout):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_records(source, tmp_path / "empty")
    assert "no images found" in str(e.value)
    assert str(tmp_path / "empty") in str(e.value)
    assert layout in str(e.value)


# --------------------------------------------------------------------------- coronahack

_CH_HEADER = ",X_ray_image_name,Label,Dataset_type,Label_2_Virus_category,Label_1_Virus_category\n"
_CH_ROWS = [  # name, Label, Dataset_type, Label_2, Label_1, expected fine label
    ("n1.jpeg", "Normal", "TRAIN", "", "", "normal"),
    ("c1.jpeg", "Pnemonia", "TRAIN", "COVID-19", "Virus", "covid"),
    ("s1.jpeg", "Pnemonia", "TRAIN", "SARS", "Virus", "sars"),
    ("a1.jpeg", "Pnemonia", "TRAIN", "ARDS", "Virus", "ards"),
    ("st1.jpeg", "Pnemonia", "TRAIN", "Streptococcus", "bacteria", "streptococcus"),
    ("b1.jpeg", "Pnemonia", "TEST", "", "bacteria", "bacterial"),
    ("v1.jpeg", "Pneumonia", "TEST", "", "Virus", "viral"),
    ("sm1.jpeg", "Pnemonia", "TRAIN", "", "Stress-Smoking", "stress_smoking"),
    ("p1.jpeg", "Pnemonia", "TEST", "", "", "pneumonia"),
    ("v2.jpeg", " pnemonia ", "test", " covid-19 ", " VIRUS ", "covid"),
]


def _coronahack(root: Path, rows=_CH_ROWS, nesting: int = 2, header: str = _CH_HEADER,
                write_images: bool = True) -> Path:
    lines = [f"{i},{n},{lab},{split},{l2},{l1}" for i, (n, lab, split, l2, l1, *_) in enumerate(rows)]
    _write(root / "Chest_xray_Corona_Metadata.csv", header + "\n".join(lines) + "\n")
    images = root.joinpath(*["Coronahack-Chest-XRay-Dataset"] * nesting)
    if write_images:
        for name, _, split, *_ in rows:
            _img(images / split.strip().lower() / name)
    return images


@pytest.mark.parametrize("nesting", [1, 2])
def test_coronahack_labels_and_splits(tmp_path, nesting):
    images = _coronahack(tmp_path / "archive", nesting=nesting)
    # Root is the folder above the unpacked archive: the CSV is found below it.
    records = load_records("coronahack", tmp_path)
    assert len(records) == len(_CH_ROWS)
    got = _by_name(records)
    for name, _, split, _, _, fine in _CH_ROWS:
        r = got[name]
        assert r.label == fine, name
        assert r.split == split.strip().lower()
        assert r.patient_id is None  # no Kermany-style name
        assert r.path == (images / split.strip().lower() / name).resolve()
        assert r.path.is_absolute()
    assert [r.path for r in records] == sorted(r.path for r in records)


def test_coronahack_patient_ids_from_kermany_file_names(tmp_path):
    rows = [("person7_bacteria_30.jpeg", "Pnemonia", "TRAIN", "", "bacteria", "bacterial"),
            ("person7_virus_31.jpeg", "Pnemonia", "TRAIN", "", "Virus", "viral"),
            ("IM-0439-0001-0002.jpeg", "Normal", "TRAIN", "", "", "normal"),
            ("NORMAL2-IM-0439-0001.jpeg", "Normal", "TEST", "", "", "normal"),
            ("covid19-case3-fig1.png", "Pnemonia", "TRAIN", "COVID-19", "Virus", "covid")]
    _coronahack(tmp_path, rows=rows)
    got = {n: r.patient_id for n, r in _by_name(load_records("coronahack", tmp_path)).items()}
    assert got == {"person7_bacteria_30.jpeg": "person7", "person7_virus_31.jpeg": "person7",
                   "IM-0439-0001-0002.jpeg": "IM-0439", "NORMAL2-IM-0439-0001.jpeg": "NORMAL2-IM-0439",
                   "covid19-case3-fig1.png": None}


def test_coronahack_missing_csv(tmp_path):
    _img(tmp_path / "Coronahack-Chest-XRay-Dataset" / "train" / "x.jpeg")
    with pytest.raises(DataError, match=r"Chest_xray_Corona_Metadata\.csv not found in .*fix"):
        load_records("coronahack", tmp_path)


def test_coronahack_wrong_header(tmp_path):
    _coronahack(tmp_path, header=",X_ray_image_name,Label,Dataset,Label_2_Virus_category,Label_1\n")
    with pytest.raises(DataError) as e:
        load_records("coronahack", tmp_path)
    msg = str(e.value)
    assert "Chest_xray_Corona_Metadata.csv" in msg
    assert "['Dataset_type', 'Label_1_Virus_category']" in msg
    assert "columns found" in msg and "'Dataset'" in msg


@pytest.mark.parametrize("row, column, bad, expected", [
    (("x.jpeg", "Pneumo", "TRAIN", "", ""), "Label", "'Pneumo'", "'pnemonia'"),
    (("x.jpeg", "Normal", "VALID", "", ""), "Dataset_type", "'VALID'", "'train'"),
    (("x.jpeg", "Pnemonia", "TRAIN", "MERS", ""), "Label_2_Virus_category", "'MERS'", "'covid-19'"),
    (("x.jpeg", "Pnemonia", "TRAIN", "", "fungus"), "Label_1_Virus_category", "'fungus'", "'stress-smoking'"),
])
def test_coronahack_unknown_values(tmp_path, row, column, bad, expected):
    rows = [r[:5] for r in _CH_ROWS[:2]] + [row]
    _coronahack(tmp_path, rows=rows, write_images=False)
    with pytest.raises(DataError) as e:
        load_records("coronahack", tmp_path)
    msg = str(e.value)
    assert f"column {column!r}" in msg
    assert f"{bad} (line 4)" in msg  # header is line 1, third data row is line 4
    assert "expected one of" in msg and expected in msg


def test_coronahack_missing_images(tmp_path):
    images = _coronahack(tmp_path)
    for name in ("c1.jpeg", "s1.jpeg"):
        (images / "train" / name).unlink()
    with pytest.raises(DataError, match=r"2 of 10 image\(s\) listed in .*Chest_xray_Corona_Metadata\.csv' "
                                         r"are missing, e\.g\. .*c1\.jpeg.*re-download"):
        load_records("coronahack", tmp_path)


def test_coronahack_missing_image_folder(tmp_path):
    _coronahack(tmp_path, write_images=False)
    with pytest.raises(DataError, match=r"no image folder Coronahack-Chest-XRay-Dataset.*unpack the whole"):
        load_records("coronahack", tmp_path)


# --------------------------------------------------------------------------- kermany

_KERMANY = {  # relative path under chest_xray -> (label, patient, split)
    "train/PNEUMONIA/person1_bacteria_1.jpeg": ("bacterial", "person1", "train"),
    "train/PNEUMONIA/person1_virus_6.jpeg": ("viral", "person1", "train"),
    "train/PNEUMONIA/person22_bacteria_77.JPEG": ("bacterial", "person22", "train"),
    "train/PNEUMONIA/person7_3.jpeg": ("pneumonia", "person7", "train"),
    "train/PNEUMONIA/scan_without_name.jpeg": ("pneumonia", None, "train"),
    "train/NORMAL/IM-0115-0001.jpeg": ("normal", "IM-0115", "train"),
    "train/NORMAL/IM-0439-0001.jpeg": ("normal", "IM-0439", "train"),
    "train/NORMAL/IM-0439-0001-0002.jpeg": ("normal", "IM-0439", "train"),
    "train/NORMAL/NORMAL2-IM-0115-0001.jpeg": ("normal", "NORMAL2-IM-0115", "train"),
    "val/NORMAL/NORMAL2-IM-1427-0001.jpeg": ("normal", "NORMAL2-IM-1427", "val"),
    "val/PNEUMONIA/person1946_bacteria_4874.jpeg": ("bacterial", "person1946", "val"),
    "test/NORMAL/IM-0001-0001.jpeg": ("normal", "IM-0001", "test"),
    "test/NORMAL/odd.png": ("normal", None, "test"),
    "test/PNEUMONIA/person100_virus_184.jpeg": ("viral", "person100", "test"),
}

_KERMANY_JUNK = [  # present in real archives, never data
    "__MACOSX/train/NORMAL/IM-9999-0001.jpeg",
    "train/NORMAL/._IM-0115-0001.jpeg",
    "chest_xray/train/NORMAL/IM-8888-0001.jpeg",  # the duplicate chest_xray/chest_xray copy
    "chest_xray/test/PNEUMONIA/person8888_virus_1.jpeg",
]


def _kermany(parent: Path) -> Path:
    base = parent / "chest_xray"
    for rel in _KERMANY:
        _img(base / rel)
    for rel in _KERMANY_JUNK:
        _img(base / rel)
    _write(base / "train" / "NORMAL" / ".DS_Store", "x")
    return base


@pytest.mark.parametrize("point_at", ["parent", "chest_xray"])
def test_kermany_labels_patients_splits(tmp_path, point_at, caplog):
    base = _kermany(tmp_path)
    root = tmp_path if point_at == "parent" else base
    with caplog.at_level(logging.WARNING, logger="cxrtune.data.sources"):
        records = load_records("kermany", root)
    got = {r.path.relative_to(base.resolve()).as_posix(): (r.label, r.patient_id, r.split) for r in records}
    assert got == _KERMANY
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 file name(s) match no known pattern" in warnings[0] and "scan_without_name.jpeg" in warnings[0]


def test_kermany_patient_groups(tmp_path):
    records = load_records("kermany", _kermany(tmp_path))
    person1 = {r.label for r in records if r.patient_id == "person1"}
    assert person1 == {"bacterial", "viral"}  # one patient, both types
    assert sum(r.patient_id == "IM-0439" for r in records) == 2  # suffixed variant joins its patient
    assert sum(r.patient_id == "IM-0115" for r in records) == 1  # NORMAL2-IM-0115 is someone else


def test_kermany_only_nested_copy(tmp_path):
    for rel in list(_KERMANY)[:3]:
        _img(tmp_path / "chest_xray" / "chest_xray" / rel)
    records = load_records("kermany", tmp_path)
    assert len(records) == 3 and {r.patient_id for r in records} == {"person1", "person22"}


# --------------------------------------------------------------------------- covid_radiography


def test_covid_radiography_current_layout(tmp_path):
    base = tmp_path / "COVID-19_Radiography_Dataset"
    for cls, n in (("COVID", 2), ("Normal", 3), ("Lung_Opacity", 1), ("Viral Pneumonia", 2)):
        for i in range(n):
            _img(base / cls / "images" / f"{cls}-{i}.png")
            _img(base / cls / "masks" / f"{cls}-{i}.png")  # masks are not images of the dataset
    _write(base / "COVID.metadata.xlsx", "x")
    records = load_records("covid_radiography", tmp_path)
    assert len(records) == 8
    assert all(r.path.parent.name == "images" for r in records)
    assert all(r.patient_id is None and r.split is None for r in records)
    counts = {lab: sum(r.label == lab for r in records) for lab in ("covid", "normal", "lung_opacity", "viral")}
    assert counts == {"covid": 2, "normal": 3, "lung_opacity": 1, "viral": 2}


def test_covid_radiography_old_flat_layout(tmp_path):
    base = tmp_path / "a" / "COVID-19 Radiography Database"
    _img(base / "COVID-19" / "COVID-19(1).png")
    _img(base / "NORMAL" / "NORMAL (1).png")
    _img(base / "Viral Pneumonia" / "Viral Pneumonia (1).png")
    got = {r.path.name: r.label for r in load_records("covid_radiography", tmp_path)}
    assert got == {"COVID-19(1).png": "covid", "NORMAL (1).png": "normal", "Viral Pneumonia (1).png": "viral"}


# --------------------------------------------------------------------------- curated


@pytest.mark.parametrize("nesting", [(), ("Curated X-Ray Dataset",), ("9xkhgts2s6-1", "Curated X-Ray Dataset")])
def test_curated(tmp_path, nesting):
    base = tmp_path.joinpath(*nesting)
    expected = {"COVID-19": "covid", "Normal": "normal", "Pneumonia-Bacterial": "bacterial",
                "Pneumonia-Viral": "viral"}
    for cls in expected:
        _img(base / cls / f"{cls} (1).jpg")
        _img(base / cls / f"{cls} (2).JPG")
    records = load_records("curated", tmp_path)
    assert len(records) == 8
    assert {r.path.name: r.label for r in records} == {
        f"{c} ({i}).{ext}": lab for c, lab in expected.items() for i, ext in ((1, "jpg"), (2, "JPG"))}
    assert all(r.patient_id is None and r.split is None for r in records)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_spellings(tmp_path):
    folders = {"Healthy": "normal", "Pneumonia-Bacterial": "bacterial", "Viral Pneumonia": "viral",
               "COVID19": "covid", "lung_opacity": "lung_opacity", "PNEUMONIA": "pneumonia"}
    for folder in folders:
        _img(tmp_path / folder / "a.png")
    _img(tmp_path / "virus" / "sub" / "b.bmp")  # images in sub-folders of a class count too
    _img(tmp_path / "virus" / "c.tif")
    _write(tmp_path / "virus" / "notes.txt", "x")
    records = load_records("imagefolder", tmp_path)
    got = {r.path.relative_to(tmp_path).as_posix(): r.label for r in records}
    assert got == {**{f"{f}/a.png": lab for f, lab in folders.items()},
                   "virus/sub/b.bmp": "viral", "virus/c.tif": "viral"}
    assert all(r.split is None and r.patient_id is None for r in records)


def test_imagefolder_splits(tmp_path):
    for split in ("train", "val", "test"):
        _img(tmp_path / split / "normal" / f"{split}.png")
        _img(tmp_path / split / "bacteria" / f"{split}.dcm")
    records = load_records("imagefolder", tmp_path)
    assert {(r.path.parent.parent.name, r.path.suffix, r.label, r.split) for r in records} == {
        (s, ext, lab, s) for s in ("train", "val", "test")
        for ext, lab in ((".png", "normal"), (".dcm", "bacterial"))}


def test_imagefolder_unknown_folder(tmp_path):
    _img(tmp_path / "normal" / "a.png")
    _img(tmp_path / "tuberculosis" / "a.png")
    with pytest.raises(DataError) as e:
        load_records("imagefolder", tmp_path)
    msg = str(e.value)
    assert "['tuberculosis']" in msg and str(tmp_path) in msg
    assert "accepted folder names" in msg and "pneumonia-bacterial" in msg
    assert "rename" in msg and "source 'csv'" in msg


def test_imagefolder_mixed_split_and_class_folders(tmp_path):
    _img(tmp_path / "train" / "normal" / "a.png")
    _img(tmp_path / "normal" / "b.png")
    with pytest.raises(DataError, match=r"mixes split folders \['train'\] with other folders \['normal'\]"):
        load_records("imagefolder", tmp_path)


# --------------------------------------------------------------------------- csv


def _csv_dataset(root: Path, text: str, name: str = "manifest.csv") -> Path:
    for rel in ("img/a.png", "img/b.png", "img/c.jpg", "d.dcm"):
        _img(root / rel)
    return _write(root / name, text)


def test_csv_full_columns(tmp_path):
    _csv_dataset(tmp_path, "path,label,patient_id,split\n"
                           "img/a.png,Normal,007,train\n"
                           "img/b.png,viral pneumonia,007,Validation\n"
                           "./img/c.jpg,COVID-19,,test\n"
                           "img/../d.dcm,bacteria,p9,\n")
    records = load_records("csv", tmp_path)  # a folder holding manifest.csv
    got = {r.path.relative_to(tmp_path).as_posix(): (r.label, r.patient_id, r.split) for r in records}
    assert got == {"img/a.png": ("normal", "007", "train"), "img/b.png": ("viral", "007", "val"),
                   "img/c.jpg": ("covid", None, "test"), "d.dcm": ("bacterial", "p9", None)}
    assert all(r.path.is_absolute() for r in records)


def test_csv_file_root_minimal_columns(tmp_path):
    csv_path = _csv_dataset(tmp_path, "Path,Label\nimg/a.png,healthy\n" + f"{tmp_path / 'd.dcm'},pneumonia\n",
                            name="mine.csv")
    records = load_records("csv", csv_path)
    assert [(r.path.name, r.label, r.patient_id, r.split) for r in records] == [
        ("d.dcm", "pneumonia", None, None), ("a.png", "normal", None, None)]  # sorted by path


def test_csv_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.csv' not found; fix: set --root \(or data\.root\) to the CSV file"):
        load_records("csv", tmp_path)


def test_csv_missing_columns(tmp_path):
    _csv_dataset(tmp_path, "file,label\nimg/a.png,normal\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['path'\]; columns found: \['file', 'label'\]"):
        load_records("csv", tmp_path)


def test_csv_unknown_label(tmp_path):
    _csv_dataset(tmp_path, "path,label\nimg/a.png,normal\nimg/b.png,TB\nimg/c.jpg,TB\n")
    with pytest.raises(DataError, match=r"column 'label' .* 'TB' \(line 3, 4\); expected one of: normal, healthy"):
        load_records("csv", tmp_path)


def test_csv_unknown_split(tmp_path):
    _csv_dataset(tmp_path, "path,label,split\nimg/a.png,normal,holdout\n")
    with pytest.raises(DataError, match=r"column 'split' .* 'holdout' \(line 2\); expected one of: train, val"):
        load_records("csv", tmp_path)


@pytest.mark.parametrize("bad", ["../outside.png", "img/../../outside.png", "ABS", "link/outside.png"])
def test_csv_path_escaping_root(tmp_path, bad):
    root = tmp_path / "data"
    outside = _img(tmp_path / "outside.png")
    (root).mkdir()
    (root / "link").symlink_to(tmp_path, target_is_directory=True)  # a symlink leading out
    bad = str(outside) if bad == "ABS" else bad
    _csv_dataset(root, f"path,label\nimg/a.png,normal\n{bad},normal\n")
    with pytest.raises(DataError) as e:
        load_records("csv", root)
    msg = str(e.value)
    assert f"line 3: {bad!r}" in msg
    assert "outside the dataset root" in msg and str(root.resolve()) in msg


def test_csv_missing_files_and_bad_extension(tmp_path):
    _csv_dataset(tmp_path, "path,label\n" + "".join(f"img/gone{i}.png,normal\n" for i in range(7))
                 + "img/a.png,normal\n")
    with pytest.raises(DataError) as e:
        load_records("csv", tmp_path)
    msg = str(e.value)
    assert "7 of 8 image(s) listed in" in msg and "manifest.csv" in msg
    assert "gone0.png" in msg and "gone4.png" in msg and "gone5.png" not in msg
    assert "re-download" in msg

    _write(tmp_path / "manifest.csv", "path,label\nimg/a.png,normal\nnotes.txt,normal\n")
    with pytest.raises(DataError, match=r"not images: line 3: 'notes\.txt'"):
        load_records("csv", tmp_path)


@pytest.mark.parametrize("bad", ["../../outside.jpeg", "../test/b1.jpeg", "ABS"])
def test_coronahack_names_escaping_their_folder_are_rejected(tmp_path, bad):
    outside = _img(tmp_path / "outside.jpeg")
    bad = str(outside) if bad == "ABS" else bad
    rows = _CH_ROWS[:2] + [(bad, "Normal", "TRAIN", "", "", "normal")]
    _coronahack(tmp_path / "archive", rows=rows[:2])
    lines = [f"{i},{n},{lab},{split},{l2},{l1}" for i, (n, lab, split, l2, l1, *_) in enumerate(rows)]
    _write(tmp_path / "archive" / "Chest_xray_Corona_Metadata.csv", _CH_HEADER + "\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_records("coronahack", tmp_path / "archive")
    assert f"line 4: {bad!r}" in str(e.value) and "outside" in str(e.value)


def test_csv_exact_duplicate_rows_keep_the_first_with_a_warning(tmp_path, caplog):
    _csv_dataset(tmp_path, "path,label,patient_id\nimg/a.png,normal,p1\nimg/b.png,viral,p2\n"
                           "img/a.png,normal,p1\n./img/b.png,viral,p2\n")
    with caplog.at_level(logging.WARNING):
        records = load_records("csv", tmp_path)
    assert [r.path.name for r in records] == ["a.png", "b.png"]
    assert "2 exact duplicate row(s)" in caplog.text and "line 2 = manifest.csv line 4" in caplog.text


@pytest.mark.parametrize("rows, what", [
    ("img/a.png,normal,p1\nimg/b.png,viral,p2\nimg/a.png,viral,p1\n", "label normal"),
    ("img/a.png,normal,p1\nimg/b.png,viral,p2\nimg/a.png,normal,p3\n", "patient p3"),
])
def test_csv_same_file_under_two_labels_or_patients_is_refused(tmp_path, rows, what):
    _csv_dataset(tmp_path, "path,label,patient_id\n" + rows)
    with pytest.raises(DataError) as e:
        load_records("csv", tmp_path)
    msg = str(e.value)
    assert "manifest.csv line 2" in msg and "manifest.csv line 4" in msg and what in msg
    assert "fix: keep one row per image" in msg


def test_same_file_reached_twice_through_a_link_is_refused(tmp_path):
    a = _img(tmp_path / "normal" / "a.png")
    _img(tmp_path / "viral" / "v.png")
    (tmp_path / "viral" / "a.png").symlink_to(a)  # one radiograph, two classes
    with pytest.raises(DataError, match=r"listed more than once.*label normal.*label viral"):
        load_records("imagefolder", tmp_path)
