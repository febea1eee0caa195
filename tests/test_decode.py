"""load_gray / to_square on small files of every pixel format a CXR dataset ships."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cxrtune.data.decode import ImageDecodeError, load_gray, to_square
from cxrtune.errors import DataError
from image_files import write_dicom

RNG = np.random.default_rng(0)


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth 8-bit gradient, so that lossy JPEG stays close to the original."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


# --------------------------------------------------------------------------- 8-bit and colour


def test_png_l_is_exact(tmp_path: Path) -> None:
    a = RNG.integers(0, 256, (30, 40), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    out = load_gray(p)
    assert out.dtype == np.uint8 and out.shape == (30, 40)
    np.testing.assert_array_equal(out, a)


def test_jpeg_l_written_by_cv2(tmp_path: Path) -> None:
    a = _smooth(32, 48)
    p = tmp_path / "a.jpg"
    cv2.imwrite(str(p), a, [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = load_gray(p)
    assert out.shape == (32, 48) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - a).mean() < 3


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_rgb_becomes_luma(tmp_path: Path, suffix: str) -> None:
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)
    rgb[:, 16:] = (0, 0, 255)
    p = tmp_path / f"c{suffix}"
    Image.fromarray(rgb).save(p, **({"quality": 95} if suffix == ".jpg" else {}))
    out = load_gray(p)
    assert out.shape == (24, 32)
    # ITU-R 601 luma: red 0.299*255 = 76, blue 0.114*255 = 29
    assert abs(int(np.median(out[:, :12])) - 76) <= 4
    assert abs(int(np.median(out[:, 20:])) - 29) <= 4


def test_rgba_and_la_drop_alpha(tmp_path: Path) -> None:
    rgba = np.full((10, 12, 4), 200, np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colour is still what we keep
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert (load_gray(tmp_path / "a.png") == 200).all()
    la = np.stack([np.full((10, 12), 100, np.uint8), np.zeros((10, 12), np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "b.png")
    assert (load_gray(tmp_path / "b.png") == 100).all()


def test_palette(tmp_path: Path) -> None:
    idx = np.zeros((8, 10), np.uint8)
    idx[:, 5:] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))
    im.save(tmp_path / "p.png")
    out = load_gray(tmp_path / "p.png")
    assert (out[:, :5] == 255).all() and (out[:, 5:] == 0).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    im = Image.new("CMYK", (32, 16), (0, 0, 0, 0))  # white
    im.paste((0, 0, 0, 255), (0, 0, 16, 16))  # left half black
    p = tmp_path / "k.jpg"
    im.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_gray(p)
    assert out.shape == (16, 32)
    assert out[:, :12].mean() < 20 and out[:, 20:].mean() > 235


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    a = np.zeros((20, 40), np.uint8)  # 40 wide, 20 high
    a[:, :20] = 255  # bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = tmp_path / "r.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    out = load_gray(p)
    assert out.shape == (40, 20)  # transposed
    # After a clockwise turn the left half is on top.
    assert out[:18].mean() > 200 and out[22:].mean() < 50


# --------------------------------------------------------------------------- more than 8 bits


def test_png16_full_range(tmp_path: Path) -> None:
    a = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    p = tmp_path / "w.png"
    cv2.imwrite(str(p), a)
    out = load_gray(p)
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_allclose(out, a / 257.0, atol=1)


def test_png16_with_12_bit_data_is_windowed_not_divided(tmp_path: Path) -> None:
    a = np.linspace(100, 4095, 20 * 10).reshape(20, 10).astype(np.uint16)
    p = tmp_path / "w12.png"
    Image.fromarray(a).save(p)
    out = load_gray(p)
    assert out.min() == 0 and out.max() == 255  # /256 would give at most 15
    np.testing.assert_allclose(out, (a - 100.0) * 255 / 3995, atol=1)


def test_int32_and_float_tiff(tmp_path: Path) -> None:
    a = np.linspace(-500, 3000, 64).reshape(8, 8).astype(np.int32)
    Image.fromarray(a).save(tmp_path / "i.tif")
    out = load_gray(tmp_path / "i.tif")
    assert out.min() == 0 and out.max() == 255
    f = np.linspace(0.0, 1.0, 64).reshape(8, 8).astype(np.float32)
    f[0, 0] = np.nan
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    out = load_gray(tmp_path / "f.tif")
    assert out.max() == 255 and out[0, 1] <= 5


# --------------------------------------------------------------------------- DICOM


def _ramp12(h: int = 8, w: int = 16) -> np.ndarray:
    return np.linspace(0, 4095, h * w).reshape(h, w).astype(np.uint16)


def test_dicom_monochrome2_scaled_by_range(tmp_path: Path) -> None:
    a = _ramp12()
    out = load_gray(write_dicom(tmp_path / "m2.dcm", a))
    assert out.dtype == np.uint8 and out.shape == a.shape
    np.testing.assert_allclose(out, a.astype(float) * 255 / 4095, atol=1)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    a = _ramp12()
    out = load_gray(write_dicom(tmp_path / "m1.dcm", a, "MONOCHROME1"))
    assert out[0, 0] == 255 and out[-1, -1] == 0  # stored 0 is white in MONOCHROME1
    np.testing.assert_allclose(out, 255 - a.astype(float) * 255 / 4095, atol=1)


def test_dicom_voi_window(tmp_path: Path) -> None:
    a = _ramp12()
    out = load_gray(write_dicom(tmp_path / "w.dcm", a, WindowCenter=2048, WindowWidth=1024))
    assert (out[a <= 1530] == 0).all() and (out[a >= 2570] == 255).all()
    mid = (a > 1600) & (a < 2500)
    np.testing.assert_allclose(out[mid], (a[mid] - 1536.0) * 255 / 1024, atol=2)


def test_dicom_window_keeps_its_meaning_when_data_does_not_fill_it(tmp_path: Path) -> None:
    a = np.linspace(1800, 2300, 64).reshape(8, 8).astype(np.uint16)
    out = load_gray(write_dicom(tmp_path / "n.dcm", a, WindowCenter=2048, WindowWidth=1024))
    # scaled by the window (1536..2560), not stretched to 0..255 by the data's own range
    assert 60 <= out.min() <= 72 and 185 <= out.max() <= 195


def test_dicom_rescale_then_window(tmp_path: Path) -> None:
    a = _ramp12()  # stored 0..4095 -> modality values -1000..3095 via the rescale
    out = load_gray(write_dicom(tmp_path / "r.dcm", a, RescaleSlope=1, RescaleIntercept=-1000,
                                 WindowCenter=1048, WindowWidth=1024))
    assert (out[a <= 1530] == 0).all() and (out[a >= 2570] == 255).all()


def test_dicom_magic_without_suffix(tmp_path: Path) -> None:
    p = write_dicom(tmp_path / "noext", _ramp12(), "MONOCHROME1")
    assert load_gray(p)[0, 0] == 255


def test_not_dicom_with_dcm_suffix(tmp_path: Path) -> None:
    p = tmp_path / "fake.dcm"
    p.write_text("hello, not a dicom file\n" * 20)
    with pytest.raises(DataError, match="fake.dcm"):
        load_gray(p)


# --------------------------------------------------------------------------- bad files


def test_zero_byte(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.touch()
    with pytest.raises(DataError, match=r"empty\.png: file is empty \(0 bytes\)") as e:
        load_gray(p)
    assert isinstance(e.value, ImageDecodeError) and e.value.reason == "file is empty (0 bytes)"


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png: file not found"):
        load_gray(tmp_path / "nope.png")


def test_text_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("these are not pixels\n")
    with pytest.raises(DataError, match=r"notes\.png: not an image / cannot be decoded"):
        load_gray(p)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated(tmp_path: Path, suffix: str) -> None:
    a = RNG.integers(0, 256, (64, 64), dtype=np.uint8)
    full = tmp_path / f"full{suffix}"
    Image.fromarray(a).save(full)
    data = full.read_bytes()
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"cut\{suffix}: truncated") as e:
        load_gray(p)
    assert e.value.reason.startswith("truncated")


# --------------------------------------------------------------------------- to_square


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (20, 30), (64, 64), (10, 1000)])
def test_to_square_shape(shape: tuple[int, int]) -> None:
    out = to_square(RNG.integers(0, 256, shape, dtype=np.uint8), 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_to_square_identity_and_centre_crop() -> None:
    a = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(to_square(a, 32), a)
    wide = np.zeros((32, 96), np.uint8)
    wide[:, 32:64] = 255  # the centre third
    np.testing.assert_array_equal(to_square(wide, 32), np.full((32, 32), 255, np.uint8))


def test_to_square_shrink_averages() -> None:
    a = np.zeros((64, 64), np.uint8)
    a[::2] = 200  # stripes a nearest-neighbour shrink would alias
    out = to_square(a, 16)
    assert np.abs(out.astype(int) - 100).max() <= 1


def test_to_square_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        to_square(np.zeros((4, 4), np.uint8), 0)
    with pytest.raises(ValueError):
        to_square(np.zeros((4, 4, 3), np.uint8), 4)
