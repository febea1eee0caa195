"""End to end through the CLI: synthetic files on disk -> adapters -> cache -> split -> inspect."""

import json
import os
import shutil
import subprocess

import cv2
import pytest
from typer.testing import CliRunner

from cxrtune.cli import app
from cxrtune.config import DataConfig
from cxrtune.data.pipeline import prepare_data
from cxrtune.data.splits import load_split

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def cli(*args, code=0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def cli_json(*args, code=0):
    return json.loads(cli(*args, "--json", code=code).stdout)


def synth(tmp_path, layout, n=120, seed=0):
    out = tmp_path / layout
    cli("data", "synth", "--out", str(out), "--n", str(n), "--layout", layout, "--seed", str(seed))
    return out


def test_embedded_default_generates_caches_and_splits(home):
    first = cli_json("data", "cache", "--image-size", "32")
    assert (home / "synthetic" / "Chest_xray_Corona_Metadata.csv").is_file()
    assert first["source"] == "synthetic" and first["n_images"] > 500
    assert set(first["split_counts"]) == {"train", "val", "test"}
    again = cli_json("data", "cache", "--image-size", "32")  # cache hit, same split file
    assert again["fingerprint"] == first["fingerprint"] and again["split_file"] == first["split_file"]


def test_prepared_rows_index_the_cache(tmp_path, home):
    data = prepare_data(DataConfig(image_size=32, synthetic_n=100), progress=False)
    from cxrtune.data.decode import load_gray, to_square

    for _, row in data.split.sample(5, random_state=0).iterrows():
        assert (data.cache.images[row["row"]] == to_square(load_gray(row["path"]), 32)).all()
    saved = load_split(data.split_path)
    assert list(saved["path"]) == list(data.split["path"])
    assert len(data.rows("train")) == len(data.targets("train")) > 0


@pytest.mark.parametrize("layout, source", [("kermany", "kermany"), ("imagefolder", "imagefolder"),
                                            ("coronahack", "coronahack")])
def test_inspect_json_on_each_layout(tmp_path, home, layout, source):
    root = synth(tmp_path, layout)
    r = cli_json("data", "inspect", "--source", source, "--root", str(root), "--task", "three_class",
                 "--image-size", "32")
    for key in ("n_images", "n_patients", "class_counts", "split_counts", "unreadable", "duplicate_groups"):
        assert key in r
    assert sum(r["class_counts"].values()) == r["n_images"] > 100
    assert set(r["split_counts"]) == {"train", "val", "test"}
    assert sum(sum(c.values()) for c in r["split_counts"].values()) == r["n_images"]
    assert r["unreadable"] == [] and r["cross_split_duplicates"] == []
    if layout == "kermany":  # several images per patient, grouped by the ids in the file names
        assert r["n_patients"] < r["n_images"] and r["patients_with_several_images"] > 0


def test_inspect_finds_unreadable_files_and_cross_split_duplicates(tmp_path, home):
    root = synth(tmp_path, "kermany")
    train = sorted((root / "chest_xray" / "train" / "PNEUMONIA").glob("person*_bacteria_*.jpeg"))[0]
    # The same radiograph, re-exported at another size, filed as someone else in test: leakage.
    img = cv2.imread(str(train), cv2.IMREAD_GRAYSCALE)
    copy = root / "chest_xray" / "test" / "PNEUMONIA" / "person9999_bacteria_1.jpeg"
    cv2.imwrite(str(copy), cv2.resize(img, None, fx=1.5, fy=1.5), [cv2.IMWRITE_JPEG_QUALITY, 80])
    (root / "chest_xray" / "train" / "NORMAL" / "IM-9998-0001.jpeg").write_bytes(b"")
    # Leakage: exit 1, the full report still printed.
    r = cli_json("data", "inspect", "--source", "kermany", "--root", str(root), "--image-size", "64", code=1)
    assert any(p.endswith("IM-9998-0001.jpeg") for p in r["unreadable"])
    assert r["leakage"] and r["leakage"][0] in r["problems"]
    assert "empty" in next(iter(r["unreadable_reasons"].values()))
    crossing = [g for g in r["cross_split_duplicates"] if any(str(copy) in p for p in g)]
    assert crossing and any(str(train) in p for p in crossing[0])


def test_bad_image_with_error_policy_fails_and_leaves_no_cache(tmp_path, home):
    root = synth(tmp_path, "imagefolder", n=60)
    good = cli_json("data", "cache", "--source", "imagefolder", "--root", str(root), "--image-size", "32")
    before = sorted(p.name for p in (home / "cache").iterdir())
    (root / "viral" / "broken.png").write_bytes(b"not a png at all")
    r = cli("data", "cache", "--source", "imagefolder", "--root", str(root), "--image-size", "32", code=2)
    assert "broken.png" in r.output and "on_bad_image: skip" in r.output
    assert "--on-bad-image skip" in r.output  # the flag of the command that failed
    assert sorted(p.name for p in (home / "cache").iterdir()) == before  # nothing half-written, old cache kept
    skip = cli_json("data", "cache", "--source", "imagefolder", "--root", str(root), "--image-size", "32",
                    "--on-bad-image", "skip")
    assert skip["skipped"][0].endswith("broken.png") and skip["n_images"] == good["n_images"]


def test_four_class_on_coronahack_needs_a_resplit(tmp_path, home):
    r = cli("data", "cache", "--task", "four_class", "--image-size", "32", code=2)
    assert "no images of class(es) covid" in r.output and "resplit_test: true" in r.output
    assert "--resplit-test" in r.output
    ok = cli_json("data", "cache", "--task", "four_class", "--image-size", "32", "--resplit-test")
    assert ok["split_counts"]["test"] > 0


@pytest.mark.parametrize("args, message", [
    (["--source", "kaggle", "--root", "."], "data.source='kaggle': unknown source; valid sources: synthetic, coronahack"),
    (["--task", "five_class"], "data.task='five_class': unknown task; valid tasks: binary, four_class"),
    (["--source", "kermany"], "data.root is required"),
    (["--source", "kermany", "--root", "/no/such/dir"], "/no/such/dir"),
    (["--image-size", "8"], "data.image_size=8"),
])
def test_bad_arguments_exit_2_with_the_fix(tmp_path, home, args, message):
    r = cli("data", "cache", *args, code=2)
    assert message in r.output


def test_synth_refuses_to_overwrite(tmp_path):
    out = synth(tmp_path, "imagefolder", n=40)
    r = cli("data", "synth", "--out", str(out), "--n", "40", "--layout", "imagefolder", code=2)
    assert "--overwrite" in r.output  # the flag the user types


def test_console_script_help():
    exe = shutil.which("cxrtune") or pytest.skip("console script not installed")
    for args in ([], ["data"], ["data", "inspect"], ["data", "cache"], ["data", "synth"]):
        out = subprocess.run([exe, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Usage" in out.stdout, (args, out.stderr)
    bad = subprocess.run([exe, "data", "cache", "--task", "nope"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CXRTUNE_HOME": "/tmp/none"})
    assert bad.returncode == 2 and "unknown task" in bad.stderr
