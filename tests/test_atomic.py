"""Atomic writes: a failure half-way leaves the previous file or folder as it was."""

from __future__ import annotations

import pytest

from cxrtune.atomic import replacing_dir, replacing_file, write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = write_text(tmp_path / "state.json", "old")
    with pytest.raises(RuntimeError), replacing_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    write_text(target, "new")
    assert target.read_text() == "new"


def test_a_failed_folder_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "best"
    with replacing_dir(target) as tmp:
        (tmp / "checkpoint.pt").write_text("epoch 1")
    with pytest.raises(RuntimeError), replacing_dir(target) as tmp:
        (tmp / "checkpoint.pt").write_text("epoch 2, half")
        raise RuntimeError("killed")
    assert (target / "checkpoint.pt").read_text() == "epoch 1"
    with replacing_dir(target) as tmp:
        (tmp / "checkpoint.pt").write_text("epoch 3")
    assert (target / "checkpoint.pt").read_text() == "epoch 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
