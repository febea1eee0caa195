"""The bad-input table: each row is a mistake a user made (a case), the command they typed,
the exit code they must get and words the message must contain (the file, the value,
the fix as they would type it). Real files on disk, the real CLI in-process; nothing
here trains or starts Ray. A regression of any message is caught here."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrtune.cli import app

runner = CliRunner()


def _png(path: Path, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(len(str(path))).integers(0, 255, (size, size), np.uint8))


def _csv(root: Path, rows: str) -> Path:
    for name in ("a", "b", "c"):
        _png(root / "img" / f"{name}.png")
    (root / "manifest.csv").write_text("path,label,patient_id\n" + rows)
    return root / "manifest.csv"


@pytest.fixture
def files(tmp_path, monkeypatch):
    """The files the cases point at, built once per test in a fresh working folder."""
    monkeypatch.setenv("CXRTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing but a comment\n")
    (tmp_path / "nospace.yaml").write_text("name: nospace\ndata: {source: synthetic}\nspace:\n")
    (tmp_path / "two_labels").mkdir()
    _csv(tmp_path / "two_labels", "img/a.png,normal,p1\nimg/b.png,viral,p2\nimg/a.png,viral,p1\n")
    (tmp_path / "two_patients").mkdir()
    _csv(tmp_path / "two_patients", "img/a.png,normal,p1\nimg/b.png,viral,p2\nimg/a.png,normal,p9\n")
    (tmp_path / "escape").mkdir()
    _csv(tmp_path / "escape", "img/a.png,normal,p1\n../outside.png,viral,p2\n")
    _png(tmp_path / "outside.png")
    (tmp_path / "not_a_checkpoint.pth.tar").write_bytes(b"\x00" * 101)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet_like.pt")
    return tmp_path


# case, command, exit code, words the message must contain
CASES = [
    # configs of `cxrtune train`
    ("empty train config", ["train", "empty.yaml"], 2, ["empty.yaml", "empty"]),
    ("train config of comments only", ["train", "comments.yaml"], 2, ["comments.yaml", "empty"]),
    ("select mode against the metric", ["train", "--set", "loop.select_metric=val/loss", "--set",
                                        "loop.select_mode=max"], 2, ["loop.select_mode=max", "val/loss", "lower"]),
    ("a word for a float", ["train", "--set", "optimizer.lr=fast"], 2, ["optimizer.lr='fast'", "float"]),
    ("focal alpha of the wrong length", ["train", "--set", "loss.name=focal", "--set", "loss.alpha=[0.5, 0.5]"],
     2, ["loss.alpha", "3"]),
    ("a chexnet file that is no checkpoint", ["train", "--set", "model.weights=chexnet:not_a_checkpoint.pth.tar"],
     2, ["not_a_checkpoint.pth.tar", "CheXNet"]),
    ("too many folds", ["train", "--set", "data.folds=1"], 2, ["data.folds=1", ">= 2"]),
    ("resume from a missing folder", ["train", "--resume", "nowhere"], 2, ["nowhere", "checkpoint"]),
    # search spaces
    ("empty space file", ["validate", "empty.yaml"], 2, ["empty.yaml", "empty"]),
    ("empty space section", ["validate", "nospace.yaml"], 2, ["no searched parameters", "cxrtune train"]),
    ("search mode against the metric", ["validate", "demo", "--set", "search.metric=val/loss", "--set",
                                        "search.mode=max"], 2, ["search.mode=max", "lower-is-better"]),
    ("a space removed by --set", ["validate", "demo", "--set", "space=null"], 2, ["no searched parameters"]),
    ("dataset root that does not exist", ["validate", "cxrnorm", "--set", "data.root=no/such/folder"], 2,
     ["no/such/folder", "coronahack", "data.root"]),
    ("debug search on a dataset root that does not exist", ["search", "cxrnorm", "--debug", "--set",
                                                             "data.root=no/such/folder"], 2,
     ["no/such/folder", "does not exist", "data.root"]),
    ("negative GPUs", ["validate", "demo", "--set", "resources.gpu=-1"], 2, ["resources.gpu=-1", "0.25"]),
    ("resume a search that never ran", ["search", "demo", "--resume"], 2, ["no search 'demo' to resume",
                                                                         "without --resume"]),
    ("unknown space", ["validate", "cxrnrom"], 2, ["cxrnrom", "bundled spaces", "cxrnorm"]),
    # datasets
    ("one file under two labels", ["data", "cache", "--source", "csv", "--root", "two_labels"], 2,
     ["manifest.csv", "line 2", "line 4", "img/a.png"]),
    ("one file under two patients", ["data", "cache", "--source", "csv", "--root", "two_patients"], 2,
     ["manifest.csv", "p9"]),
    ("a manifest path leaving its folder", ["data", "cache", "--source", "csv", "--root", "escape"], 2,
     ["../outside.png", "line 3"]),
    ("an official test split without a class", ["data", "cache", "--task", "four_class"], 2,
     ["--resplit-test", "data.resplit_test: true"]),
    ("synthetic data over an earlier set", ["data", "synth", "--out", "home/synthetic", "--n", "20"], 2,
     ["--overwrite"]),
    ("a fraction outside (0, 1)", ["data", "inspect", "--val-fraction", "1.5"], 2, ["val_fraction=1.5"]),
]


@pytest.mark.parametrize("case, command, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_exit_code_and_a_message_naming_the_fix(files, case, command, code, words):
    if case == "synthetic data over an earlier set":
        assert runner.invoke(app, ["data", "synth", "--out", "home/synthetic", "--n", "20"]).exit_code == 0
    result = runner.invoke(app, command)
    assert result.exit_code == code, f"{case}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output
    message = result.output[result.output.index("error:"):] if "error:" in result.output else result.output
    for word in words:
        assert word in message, f"{case}: {word!r} not in\n{message}"
