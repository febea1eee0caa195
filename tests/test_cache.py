"""ImageCache: decode once, reuse while the files are unchanged, never trust a half-written cache."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrtune.data import cache as cache_mod
from cxrtune.data.cache import ON_BAD_IMAGE, BadImage, ImageCache, build_cache, fingerprint
from cxrtune.data.decode import load_gray, to_square
from cxrtune.errors import ConfigError, DataError

SIZE = 16


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Two dozen small files of different sizes and formats, written with OpenCV."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(24):
        h, w = 20 + 3 * i, 48 - i
        ext = (".png", ".jpg", ".bmp")[i % 3]
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if i % 4 == 1:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        p = folder / f"img{i:02d}{ext}"
        assert cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: str, size: int):
        raise AssertionError(f"decoded {path} although the cache should have been reused")

    monkeypatch.setattr(cache_mod, "_decode_one", fail)


def test_build_matches_decode(images: list[Path], tmp_path: Path) -> None:
    c = build_cache(images, SIZE, tmp_path / "cache", workers=1, progress=False)
    assert isinstance(c.images, np.memmap) and c.images.dtype == np.uint8
    assert c.images.shape == (len(images), SIZE, SIZE) and len(c) == len(images)
    assert c.paths == tuple(str(p.absolute()) for p in images) and c.skipped == ()
    assert c.directory == tmp_path / "cache" / c.fingerprint
    for i, p in enumerate(images):
        np.testing.assert_array_equal(c.images[i], to_square(load_gray(p), SIZE))
    assert c.index()[str(images[5])] == 5
    assert _leftovers(tmp_path / "cache") == [c.fingerprint]


def test_second_build_is_a_hit(images: list[Path], tmp_path: Path, monkeypatch, caplog) -> None:
    first = build_cache(images, SIZE, tmp_path / "cache", workers=1, progress=False)
    created = json.loads((first.directory / "meta.json").read_text())["created"]
    _no_decoding(monkeypatch)
    with caplog.at_level(logging.INFO, logger="cxrtune.data.cache"):
        again = build_cache(images, SIZE, tmp_path / "cache", workers=1, progress=False)
    assert "cache hit" in caplog.text
    assert again.fingerprint == first.fingerprint
    assert json.loads((again.directory / "meta.json").read_text())["created"] == created
    np.testing.assert_array_equal(again.images, first.images)


def test_fingerprint_follows_files_size_and_order(images: list[Path]) -> None:
    fp = fingerprint(images, SIZE)
    assert fp == fingerprint([str(p) for p in images], SIZE) and 16 <= len(fp) <= 20
    assert fingerprint(images, SIZE + 1) != fp
    assert fingerprint(images[::-1], SIZE) != fp
    st = images[3].stat()
    os.utime(images[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fingerprint(images, SIZE) != fp


def test_changed_file_rebuilds(images: list[Path], tmp_path: Path) -> None:
    first = build_cache(images, SIZE, tmp_path / "cache", workers=1, progress=False)
    new = np.full((30, 30), 77, np.uint8)
    cv2.imwrite(str(images[0]), new)  # rewritten: new size and mtime
    st = images[0].stat()
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    second = build_cache(images, SIZE, tmp_path / "cache", workers=1, progress=False)
    assert second.fingerprint != first.fingerprint
    assert (second.images[0] == 77).all()
    np.testing.assert_array_equal(second.images[1:], first.images[1:])


def _bad_files(folder: Path) -> list[Path]:
    empty = folder / "empty.png"
    empty.touch()
    text = folder / "text.png"
    text.write_text("not an image\n")
    return [empty, text]


def test_bad_images_error_lists_all_and_leaves_nothing(images: list[Path], tmp_path: Path) -> None:
    bad = _bad_files(tmp_path)
    root = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        build_cache(images[:3] + [bad[0]] + images[3:] + [bad[1]], SIZE, root, workers=1, progress=False)
    msg = str(e.value)
    assert "2 of 26 image(s)" in msg
    assert f"{bad[0]}: file is empty (0 bytes)" in msg
    assert f"{bad[1]}: not an image / cannot be decoded" in msg
    assert "data.on_bad_image: skip" in msg
    assert _leftovers(root) == []


def test_bad_images_skip(images: list[Path], tmp_path: Path, caplog) -> None:
    bad = _bad_files(tmp_path)
    order = images[:3] + [bad[0]] + images[3:] + [bad[1]]
    with caplog.at_level(logging.WARNING, logger="cxrtune.data.cache"):
        c = build_cache(order, SIZE, tmp_path / "cache", on_bad_image="skip", workers=1, progress=False)
    assert "skipped 2 of 26" in caplog.text and "empty.png" in caplog.text
    assert [b.path for b in c.skipped] == [str(b) for b in bad]
    assert all(isinstance(b, BadImage) and b.reason for b in c.skipped)
    assert c.paths == tuple(str(p) for p in images) and c.images.shape == (len(images), SIZE, SIZE)
    for i, p in enumerate(images):
        np.testing.assert_array_equal(c.images[i], to_square(load_gray(p), SIZE))
    reopened = ImageCache.open(c.directory)  # the shrunk .npy is consistent with its meta
    assert reopened.skipped == c.skipped and reopened.images.shape == c.images.shape
    # A later "error" run must not silently accept the cache that "skip" built.
    with pytest.raises(DataError, match="empty.png"):
        build_cache(order, SIZE, tmp_path / "cache", workers=1, progress=False)


def test_skip_falls_back_to_copy_when_header_length_differs(images, tmp_path, monkeypatch) -> None:
    bad = _bad_files(tmp_path)
    real = np.lib.format.write_array_header_1_0

    def longer(fp, d):
        real(fp, d)
        fp.write(b" " * 64)  # any length other than the file's

    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", longer)
    c = build_cache(bad + images[:4], SIZE, tmp_path / "cache", on_bad_image="skip", workers=1, progress=False)
    monkeypatch.undo()
    for i, p in enumerate(images[:4]):
        np.testing.assert_array_equal(c.images[i], to_square(load_gray(p), SIZE))


def test_all_bad_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="none of the images"):
        build_cache(_bad_files(tmp_path), SIZE, tmp_path / "cache", on_bad_image="skip", workers=1,
                    progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_invalid_arguments(images: list[Path], tmp_path: Path) -> None:
    assert ON_BAD_IMAGE == ("error", "skip")
    with pytest.raises(ConfigError, match="valid values: error, skip"):
        build_cache(images, SIZE, tmp_path / "c", on_bad_image="ignore")
    with pytest.raises(ConfigError):
        build_cache(images, 0, tmp_path / "c")
    with pytest.raises(ConfigError):
        build_cache(images, SIZE, tmp_path / "c", workers=-1)
    with pytest.raises(DataError, match="empty"):
        build_cache([], SIZE, tmp_path / "c")


@pytest.mark.parametrize("damage", ["no_meta", "truncated_npy", "wrong_shape"])
def test_corrupt_cache_detected_and_rebuilt(images, tmp_path: Path, damage: str) -> None:
    root = tmp_path / "cache"
    good = build_cache(images, SIZE, root, workers=1, progress=False)
    expected = np.array(good.images)
    directory = good.directory
    del good
    if damage == "no_meta":
        (directory / "meta.json").unlink()
    elif damage == "truncated_npy":
        with open(directory / "images.npy", "r+b") as f:
            f.truncate(os.path.getsize(directory / "images.npy") // 2)
    else:
        meta = json.loads((directory / "meta.json").read_text())
        meta["size"] = SIZE + 1
        (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="incomplete or corrupt.*delete it and rebuild"):
        ImageCache.open(directory)
    rebuilt = build_cache(images, SIZE, root, workers=1, progress=False)
    np.testing.assert_array_equal(rebuilt.images, expected)
    assert _leftovers(root) == [rebuilt.fingerprint]


def test_two_workers_equal_one(images: list[Path], tmp_path: Path) -> None:
    one = build_cache(images, SIZE, tmp_path / "a", workers=1, progress=False)
    two = build_cache(images, SIZE, tmp_path / "b", workers=2, progress=False)
    assert two.paths == one.paths
    np.testing.assert_array_equal(two.images, one.images)


def test_failure_mid_build_leaves_nothing(images: list[Path], tmp_path: Path, monkeypatch) -> None:
    real = cache_mod._decode_one
    calls = []

    def flaky(path: str, size: int):
        calls.append(path)
        if len(calls) == 10:
            raise RuntimeError("disk on fire")
        return real(path, size)

    monkeypatch.setattr(cache_mod, "_decode_one", flaky)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_cache(images, SIZE, root, workers=1, progress=False)
    assert _leftovers(root) == []
    monkeypatch.setattr(cache_mod, "_decode_one", real)
    assert len(build_cache(images, SIZE, root, workers=1, progress=False)) == len(images)


def test_lost_race_uses_the_other_processes_cache(images, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "cache"
    theirs = build_cache(images, SIZE, root, workers=1, progress=False)
    real = cache_mod._open_valid
    first_look = []

    def not_yet_there(directory: Path, fp: str):
        if not first_look:  # our first check runs before "their" rename
            first_look.append(1)
            return None
        return real(directory, fp)

    monkeypatch.setattr(cache_mod, "_open_valid", not_yet_there)
    ours = build_cache(images, SIZE, root, workers=1, progress=False)
    assert ours.directory == theirs.directory
    assert _leftovers(root) == [theirs.fingerprint]


def test_pickle_sends_the_directory_not_the_pixels(images: list[Path], tmp_path: Path) -> None:
    c = build_cache(images, SIZE, tmp_path / "cache", workers=1, progress=False)
    blob = pickle.dumps(c)
    assert len(blob) < c.images.nbytes
    back = pickle.loads(blob)
    assert back.paths == c.paths and isinstance(back.images, np.memmap)
    np.testing.assert_array_equal(back.images, c.images)


def test_small_images_and_alpha_are_reported_once_with_a_count(images, tmp_path: Path, caplog) -> None:
    from PIL import Image

    small = [tmp_path / "imgs" / f"tiny{i}.png" for i in range(3)]
    for p in small:
        assert cv2.imwrite(str(p), np.full((8, 8), 90, np.uint8))  # below the 16 px cache size
    rgba = np.full((30, 30, 4), 120, np.uint8)
    rgba[..., 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs" / "alpha.png")
    paths = images + small + [tmp_path / "imgs" / "alpha.png"]
    with caplog.at_level(logging.INFO, logger="cxrtune.data.cache"):
        build_cache(paths, SIZE, tmp_path / "cache", workers=2, progress=False)
    up = [r for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(up) == 1 and up[0].levelno == logging.WARNING
    assert f"3 of {len(paths)} images are smaller than {SIZE} px" in up[0].getMessage()
    assert "tiny0.png" in up[0].getMessage()
    alpha = [r for r in caplog.records if "alpha (transparency)" in r.getMessage()]
    assert len(alpha) == 1 and f"1 of {len(paths)} images" in alpha[0].getMessage()
    assert "alpha.png" in alpha[0].getMessage()
