"""Tests for the SYNTHETIC chest X-ray phantom generator (cxrtune.data.synthetic)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrtune.errors import ConfigError, DataError
from cxrtune.data import synthetic
from cxrtune.data.synthetic import (
    CORONAHACK_CSV,
    LAYOUTS,
    MARKER_NAME,
    ensure_synthetic,
    render_phantom,
    write_synthetic,
)

SMALL = (48, 80)  # small images keep the tests fast
CH_IMAGES = Path("Coronahack-Chest-XRay-Dataset", "Coronahack-Chest-XRay-Dataset")


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _images(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix in (".png", ".jpg", ".jpeg")]


@pytest.fixture(scope="module")
def coronahack(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ch")
    return out, write_synthetic(out, n=320, layout="coronahack", seed=3, size_range=SMALL)


def _read_csv(root: Path) -> list[list[str]]:
    with (root / CORONAHACK_CSV).open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("layout", ["coronahack", "kermany", "imagefolder"])
def test_same_seed_gives_identical_bytes(tmp_path, layout):
    a = write_synthetic(tmp_path / "a", n=40, layout=layout, seed=7, size_range=SMALL)
    b = write_synthetic(tmp_path / "b", n=40, layout=layout, seed=7, size_range=SMALL)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(da) >= 41  # 40 images + marker (+ CSV)
    assert da == db
    assert {k: v for k, v in a.items() if k != "root"} == {k: v for k, v in b.items() if k != "root"}


def test_different_seed_gives_different_images(tmp_path):
    write_synthetic(tmp_path / "a", n=40, seed=1, size_range=SMALL, layout="imagefolder")
    write_synthetic(tmp_path / "b", n=40, seed=2, size_range=SMALL, layout="imagefolder")
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert set(da.values()).isdisjoint(db.values())


def test_images_do_not_depend_on_layout_or_generation_order():
    img = synthetic._Image(index=5, label="viral", patient=0, k=0, split="train")
    s1 = synthetic._render_sample(img, 11, SMALL)
    synthetic._render_sample(synthetic._Image(4, "normal", 0, 0, "train"), 11, SMALL)
    s2 = synthetic._render_sample(img, 11, SMALL)
    assert np.array_equal(s1.pixels, s2.pixels)


# ---------------------------------------------------------------------- layouts


def test_coronahack_layout_and_csv(coronahack):
    root, summary = coronahack
    rows = _read_csv(root)
    assert rows[0] == [
        "",
        "X_ray_image_name",
        "Label",
        "Dataset_type",
        "Label_2_Virus_category",
        "Label_1_Virus_category",
    ]
    body = rows[1:]
    assert [r[0] for r in body] == [str(i) for i in range(len(body))]
    assert len(body) == 320 == summary["n"]
    assert {r[2] for r in body} == {"Normal", "Pnemonia"}
    assert {r[3] for r in body} == {"TRAIN", "TEST"}
    for _, name, label, dtype, l2, l1 in body:
        assert (root / CH_IMAGES / dtype.lower() / name).is_file(), name
        if label == "Normal":
            assert (l1, l2) == ("", "")
        else:
            assert l1 in ("bacteria", "Virus")
            assert l2 in ("", "COVID-19")
            if l2 == "COVID-19":
                assert l1 == "Virus"
    # flat folders, mixed extensions, nothing unlisted
    on_disk = {p.name for p in _images(root / CH_IMAGES)}
    assert on_disk == {r[1] for r in body}
    assert {p.suffix for p in _images(root / CH_IMAGES)} == {".jpeg", ".jpg", ".png"}
    assert all(p.parent.name in ("train", "test") for p in _images(root / CH_IMAGES))
    assert (root / MARKER_NAME).is_file()


def test_coronahack_counts_and_imbalance(coronahack):
    root, summary = coronahack
    body = _read_csv(root)[1:]
    covid = [r for r in body if r[4] == "COVID-19"]
    assert len(covid) >= 8
    assert all(r[3] == "TRAIN" for r in covid)  # like the real data: no COVID-19 in TEST
    test = [r for r in body if r[3] == "TEST"]
    assert 0.1 <= len(test) / len(body) <= 0.2
    assert {r[2] for r in test} == {"Normal", "Pnemonia"}
    c = summary["classes"]
    assert sum(c.values()) == 320
    assert c["bacterial"] > c["normal"] > c["covid"] and c["viral"] > c["covid"]
    assert 0.2 <= c["normal"] / 320 <= 0.33 and 0.4 <= c["bacterial"] / 320 <= 0.52
    assert 0.18 <= c["viral"] / 320 <= 0.3
    assert "covid" not in summary["by_split"]["test"]
    assert summary["splits"] == {"test": len(test), "train": len(body) - len(test)}
    assert summary["n_patients"] < 320  # several images for some patients
    assert summary["layout"] == "coronahack" and Path(summary["root"]) == root


def test_bit_depths_and_channels(coronahack):
    root, _ = coronahack
    kinds = set()
    for p in _images(root / CH_IMAGES):
        a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert a is not None, p
        kinds.add((a.dtype.name, a.ndim))
        if a.dtype == np.uint16:
            assert p.suffix == ".png"
    assert ("uint8", 2) in kinds
    assert ("uint16", 2) in kinds
    assert ("uint8", 3) in kinds
    sixteen = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in _images(root / CH_IMAGES) if p.suffix == ".png"]
    maxima = [int(a.max()) for a in sixteen if a.dtype == np.uint16]
    assert any(m > 4095 for m in maxima) and any(m <= 4095 for m in maxima)  # full and 12-bit ranges


def test_sizes_vary_within_range(coronahack):
    root, _ = coronahack
    shapes = {cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2] for p in _images(root / CH_IMAGES)[:80]}
    assert len(shapes) > 10
    assert all(SMALL[0] <= s <= SMALL[1] for hw in shapes for s in hw)
    assert any(h != w for h, w in shapes)


def test_kermany_layout(tmp_path):
    summary = write_synthetic(tmp_path, n=320, layout="kermany", seed=5, size_range=SMALL)
    base = tmp_path / "chest_xray"
    assert sorted(p.name for p in base.iterdir()) == ["test", "train", "val"]
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (base / split).iterdir()) == ["NORMAL", "PNEUMONIA"]
    files = _images(base)
    assert len(files) == 320 and {p.suffix for p in files} == {".jpeg"}
    pneu_re = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
    norm_re = re.compile(r"^(NORMAL2-)?IM-(\d{4})-0001(-\d{4})?\.jpeg$")
    kinds_by_person: dict[str, set[str]] = {}
    normal_names = []
    for p in files:
        if p.parent.name == "PNEUMONIA":
            m = pneu_re.match(p.name)
            assert m, p.name
            kinds_by_person.setdefault(m.group(1), set()).add(m.group(2))
        else:
            assert norm_re.match(p.name), p.name
            normal_names.append(p.name)
    assert any(len(k) == 2 for k in kinds_by_person.values())  # bacteria and virus, same person
    assert any(n.startswith("NORMAL2-") for n in normal_names)
    assert any(n.endswith("-0001-0002.jpeg") for n in normal_names)
    assert "covid" not in summary["classes"]  # covid becomes viral here
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert summary["splits"]["val"] >= 2
    assert not (tmp_path / CORONAHACK_CSV).exists()


def test_imagefolder_layout(tmp_path):
    summary = write_synthetic(tmp_path, n=60, layout="imagefolder", seed=0, size_range=SMALL)
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert dirs == ["bacterial", "covid", "normal", "viral"]
    for d in dirs:
        files = list((tmp_path / d).iterdir())
        assert files and all(p.suffix == ".png" for p in files)
        assert len(files) == summary["classes"][d]
    assert sum(summary["classes"].values()) == 60


def test_unknown_layout_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError) as e:
        write_synthetic(tmp_path, n=10, layout="nih")
    for name in ("coronahack", "imagefolder", "kermany"):
        assert name in str(e.value)
    assert sorted(LAYOUTS) == ["coronahack", "imagefolder", "kermany"]


@pytest.mark.parametrize("kw", [{"n": 0}, {"n": 2.5}, {"size_range": (8, 16)}, {"size_range": (100, 50)}])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ConfigError):
        write_synthetic(tmp_path, **kw)


def test_existing_dataset_needs_overwrite(tmp_path):
    write_synthetic(tmp_path, n=30, layout="coronahack", seed=0, size_range=SMALL)
    before = _digest(tmp_path)
    with pytest.raises(DataError, match="overwrite=True"):
        write_synthetic(tmp_path, n=20, layout="coronahack", seed=1, size_range=SMALL)
    assert _digest(tmp_path) == before
    with pytest.raises(DataError):
        write_synthetic(tmp_path, n=20, layout="imagefolder", seed=1, size_range=SMALL)
    (tmp_path / "notes.txt").write_text("mine")
    write_synthetic(tmp_path, n=20, layout="coronahack", seed=1, size_range=SMALL, overwrite=True)
    assert len(_read_csv(tmp_path)) == 21
    assert len(_images(tmp_path)) == 20  # the old images are gone
    assert (tmp_path / "notes.txt").read_text() == "mine"  # unrelated files kept


# ----------------------------------------------------------------------- findings


def _lung_mean(label: str, seed: int) -> float:
    p = render_phantom(label, seed=seed, shape=(80, 80))
    assert p.image.dtype == np.float32 and 0.0 <= p.image.min() and p.image.max() <= 1.0
    return float(p.image[p.lung_mask].mean())


@pytest.mark.parametrize("label", ["bacterial", "viral", "covid"])
def test_findings_raise_lung_density_on_average(label):
    normal = np.mean([_lung_mean("normal", s) for s in range(100)])
    sick = np.mean([_lung_mean(label, s) for s in range(1000, 1100)])
    assert sick > normal + 0.005


@pytest.mark.parametrize("label", ["bacterial", "viral", "covid"])
def test_findings_paired_with_same_anatomy(label):
    # The finding is drawn after the anatomy, so the same seed gives the same chest.
    for s in range(20):
        n = render_phantom("normal", seed=s, shape=(80, 80))
        f = render_phantom(label, seed=s, shape=(80, 80))
        assert np.array_equal(n.lung_mask, f.lung_mask)
        diff = f.image - n.image
        assert diff.min() >= -1e-6
        assert diff[n.lung_mask].mean() > 0.002
        assert np.abs(diff[~n.lung_mask]).sum() < 0.5 * diff[n.lung_mask].sum()  # mostly inside the lungs


def _side_gain(label: str, seed: int) -> tuple[float, float, float, float]:
    n = render_phantom("normal", seed=seed, shape=(96, 96))
    f = render_phantom(label, seed=seed, shape=(96, 96))
    diff = (f.image - n.image) * n.lung_mask
    cols = np.nonzero(n.lung_mask.any(axis=0))[0]
    mid = (cols.min() + cols.max()) // 2
    left, right = diff[:, :mid].sum(), diff[:, mid:].sum()
    # peripheral (outer quarter of each lung's width) vs inner
    lx = np.nonzero(n.lung_mask[:, :mid].any(axis=0))[0]
    rx = np.nonzero(n.lung_mask[:, mid:].any(axis=0))[0] + mid
    q_l, q_r = (lx.max() - lx.min()) // 4, (rx.max() - rx.min()) // 4
    outer = diff[:, lx.min() : lx.min() + q_l].sum() + diff[:, rx.max() - q_r : rx.max() + 1].sum()
    inner = diff[:, lx.max() - q_l : lx.max() + 1].sum() + diff[:, rx.min() : rx.min() + q_r].sum()
    return left, right, outer, inner


def test_finding_distributions():
    bac = [_side_gain("bacterial", s) for s in range(20)]
    # unilateral: nearly all added density in one lung
    assert all(min(l, r) < 0.2 * max(l, r) for l, r, _, _ in bac)
    vir = [_side_gain("viral", s) for s in range(20)]
    assert all(min(l, r) > 0.5 * max(l, r) for l, r, _, _ in vir)  # bilateral
    cov = [_side_gain("covid", s) for s in range(20)]
    assert all(min(l, r) > 0 for l, r, _, _ in cov)
    cov_outer = sum(o for *_, o, _ in cov) / sum(o + i for *_, o, i in cov)
    vir_outer = sum(o for *_, o, _ in vir) / sum(o + i for *_, o, i in vir)
    assert cov_outer > 0.8 and vir_outer < 0.6  # covid is peripheral, viral is not


def test_scanner_variation_changes_image():
    a = render_phantom("normal", seed=4, shape=(64, 72))
    b = render_phantom("normal", seed=4, shape=(64, 72), scanner=True)
    assert a.image.shape == b.image.shape == (64, 72)
    assert not np.allclose(a.image, b.image)
    with pytest.raises(ConfigError):
        render_phantom("tuberculosis")


# ---------------------------------------------------------------- ensure_synthetic


def test_ensure_synthetic_generates_once(tmp_path, caplog, monkeypatch):
    root = tmp_path / "data" / "synthetic"
    with caplog.at_level(logging.INFO, logger="cxrtune.data.synthetic"):
        assert ensure_synthetic(root, n=30, seed=2) == root
    infos = [r for r in caplog.records if r.name == "cxrtune.data.synthetic" and r.levelno == logging.INFO]
    assert len(infos) == 1 and str(root) in infos[0].getMessage()
    assert "synthetic" in infos[0].getMessage().lower()
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["n"] == 30 and marker["seed"] == 2 and marker["layout"] == "coronahack"
    assert marker["version"] == synthetic.SYNTHETIC_VERSION
    assert (root / CORONAHACK_CSV).is_file()
    assert [p.name for p in root.parent.iterdir()] == ["synthetic"]  # no temp siblings left
    before = _digest(root)

    def boom(*a, **k):
        raise AssertionError("regenerated although the marker is present")

    monkeypatch.setattr(synthetic, "write_synthetic", boom)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxrtune.data.synthetic"):
        assert ensure_synthetic(root, n=30, seed=2) == root
    assert not caplog.records
    assert _digest(root) == before


def test_ensure_synthetic_regenerates_stale_or_half_written(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic(root, n=20, seed=0)
    ensure_synthetic(root, n=24, seed=0)  # different n: replaced
    assert len(_read_csv(root)) == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]
    (root / MARKER_NAME).write_text(json.dumps({"version": 0}))  # stale version
    ensure_synthetic(root, n=24, seed=0)
    assert json.loads((root / MARKER_NAME).read_text())["version"] == synthetic.SYNTHETIC_VERSION


def test_ensure_synthetic_refuses_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "x-ray.png").write_bytes(b"not ours")
    with pytest.raises(DataError, match="not a cxrtune synthetic dataset"):
        ensure_synthetic(root, n=20)
    assert (root / "x-ray.png").read_bytes() == b"not ours"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_synthetic(empty, n=20) == empty
    assert (empty / CORONAHACK_CSV).is_file()


def test_module_docstring_says_synthetic():
    doc = synthetic.__doc__ or ""
    assert "SYNTHETIC" in doc and "NOT medical images" in doc
