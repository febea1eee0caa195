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


def test_what_is_written_gets_the_modes_a_plain_file_and_folder_get(tmp_path):
    """Reports and checkpoints are read by others (a shared cluster folder, a web server):
    not the private 0600 / 0700 of a temporary file."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    file = write_text(tmp_path / "report.html", "<html>")
    with replacing_dir(tmp_path / "report") as tmp:
        (tmp / "a.png").write_bytes(b"png")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(file) == mode(tmp_path / "plain.txt") and mode(tmp_path / "report") == mode(tmp_path / "plain")
