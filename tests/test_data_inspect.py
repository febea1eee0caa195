"""`cxrtune data inspect` as an audit: always a full report, problems listed, exit 1 on leakage."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cxrtune.cli import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def invoke(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.normal(size=(48, 48)).astype(np.float32), (0, 0), 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))


def _manifest(root: Path, viral_patients: int = 10, extra: str = "") -> Path:
    """40 normal and 40 bacterial patients, ``viral_patients`` viral ones, 2 images each."""
    rows = ["path,label,patient_id"]
    seed = 0
    for label, n in (("normal", 40), ("bacterial", 40), ("viral", viral_patients)):
        for p in range(n):
            for k in range(2):
                seed += 1
                name = f"img/{label}_{p}_{k}.png"
                _image(root / name, seed)
                rows.append(f"{name},{label},{label[0]}{p}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n" + extra)
    return root


def test_problems_are_listed_in_a_full_report_instead_of_exiting(tmp_path, home):
    # The synthetic CoronaHack's official TEST part has no COVID-19 images: four_class
    # cannot use it. Inspect still reports everything, and says what to type.
    r = json.loads(invoke("data", "inspect", "--task", "four_class", "--image-size", "32", "--json").stdout)
    assert r["n_images"] > 500 and set(r["split_counts"]) == {"train", "val", "test"}
    assert r["fine_label_counts"] and "dropped" in r and "unreadable" in r
    assert any("no images of class(es) covid" in p and "--resplit-test" in p for p in r["problems"])
    assert r["leakage"] == []
    table = invoke("data", "inspect", "--task", "four_class", "--image-size", "32").stdout
    assert "problem(s)" in table and "--resplit-test" in table


def test_a_split_without_a_class_is_a_listed_problem(tmp_path, home):
    root = _manifest(tmp_path / "data", viral_patients=1)  # 2 viral images of one patient
    r = json.loads(invoke("data", "inspect", "--source", "csv", "--root", str(root), "--image-size", "32",
                          "--min-class-count", "2", "--json").stdout)
    missing = [p for p in r["problems"] if "would have no viral images" in p]
    assert len(missing) == 2  # the one patient sits in one split; the other two lack viral
    assert r["class_counts"]["viral"] == 2
    assert any("--val-fraction" in p or "--test-fraction" in p for p in missing)  # flags that exist


def test_fraction_options_are_honoured(tmp_path, home):
    root = _manifest(tmp_path / "data")
    r = json.loads(invoke("data", "inspect", "--source", "csv", "--root", str(root), "--image-size", "32",
                          "--val-fraction", "0.4", "--test-fraction", "0.3", "--json").stdout)
    n = {s: sum(c.values()) for s, c in r["split_counts"].items()}
    assert abs(n["test"] / r["n_images"] - 0.3) <= 2 / r["n_images"] + 1e-9  # one patient = 2 images
    pool = n["train"] + n["val"]
    assert abs(n["val"] / pool - 0.4) <= 2 / pool + 1e-9


def test_min_class_count_option_and_a_correct_hint(tmp_path, home):
    root = _manifest(tmp_path / "data", viral_patients=1)
    r = json.loads(invoke("data", "inspect", "--source", "csv", "--root", str(root), "--image-size", "32",
                          "--json").stdout)
    hint = next(p for p in r["problems"] if "min_class_count=3" in p)
    assert "--min-class-count 2" in hint  # lowering keeps the class; the flag exists
    assert r["dropped"]["viral"]["reason"].startswith("task class 'viral' has only 2 image(s)")
    invoke("data", "cache", "--source", "csv", "--root", str(root), "--image-size", "32",
           "--min-class-count", "2", code=2)  # accepted option; the split problem remains


def test_inspect_builds_no_cache(tmp_path, home):
    root = _manifest(tmp_path / "data")
    invoke("data", "inspect", "--source", "csv", "--root", str(root), "--image-size", "32", "--json")
    cache = home / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_leakage_exits_1_with_the_full_report(tmp_path, home):
    # Line 4 lists the image of line 2 (patient n0) again, for patient n7: two patients.
    root = _manifest(tmp_path / "data", extra="img/normal_0_0.png,normal,n7\n")
    out = invoke("data", "inspect", "--source", "csv", "--root", str(root), "--image-size", "32",
                 "--json", code=1).stdout
    r = json.loads(out)
    assert r["n_images"] > 0 and r["split_counts"]
    assert r["leakage"] and "manifest.csv line 2" in r["leakage"][0]
    assert "manifest.csv line 182" in r["leakage"][0]
    # The commands that build refuse it, naming the lines (exit 2).
    bad = invoke("data", "cache", "--source", "csv", "--root", str(root), "--image-size", "32", code=2)
    assert "line 182" in bad.output and "keep one row per image" in bad.output


def test_help_documents_exit_codes():
    out = invoke("data", "inspect", "--help").stdout
    assert "leakage" in out and "1" in out and "--min-class-count" in out
    assert "--min-class-count" in invoke("data", "cache", "--help").stdout


def test_text_report_shows_images_that_look_off_and_what_dedupe_does(tmp_path, home):
    root = _manifest(tmp_path / "data", extra="img/tinted-copy.jpg,normal,n0\n")
    # A re-exported colour copy of patient n0's image, filed with n0: a near-duplicate in
    # one split (no leakage) and a tinted image.
    grey = cv2.imread(str(root / "img/normal_0_0.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    tinted = np.stack([grey * 0.6, grey * 0.85, grey], axis=-1)
    cv2.imwrite(str(root / "img/tinted-copy.jpg"), cv2.resize(tinted, None, fx=1.5, fy=1.5).astype(np.uint8))
    args = ("data", "inspect", "--source", "csv", "--root", str(root), "--image-size", "32")
    out = invoke(*args).stdout
    assert "1 near-duplicate groups, 0 crossing splits" in out
    assert "data.dedupe=across_splits moves 0 and removes 0 of these images" in out
    assert "tinted (colour channels differ): img/tinted-copy.jpg" in out
    assert "--write-exclusions FILE" in out
    r = json.loads(invoke(*args, "--json").stdout)
    assert r["dedupe"] == {"mode": "across_splits", "moved": 0, "removed": 0}
    assert [i["name"] for i in r["looks_off"]["tinted"]] == ["img/tinted-copy.jpg"]
    assert r["exclusions_file"] is None
    # An exclusion list that cannot be written is a clear error (exit 2), not a traceback.
    (tmp_path / "a-file").write_text("")
    bad = invoke(*args, "--write-exclusions", str(tmp_path / "a-file" / "list.txt"), code=2)
    assert "cannot write the exclusion list" in bad.output and "list.txt" in bad.output
    assert "--write-exclusions" in invoke("data", "inspect", "--help").stdout
