"""Image files the tests write: real files on disk, as a scanner or PACS export would give."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, **tags) -> Path:
    """A Part 10 DICOM file of ``pixels`` (16 bits allocated, ``bits`` stored); ``tags``
    set as given (e.g. WindowCenter, RescaleSlope)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path)
    return path


LABELS = ("normal", "bacterial", "viral")


def radiograph(seed: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth random image: distinct seeds give clearly different low frequencies."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.normal(size=shape).astype(np.float32), (0, 0), 5)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def patients_manifest(root: Path, patients: int, test_patients: int) -> list[str]:
    """``patients`` patients per class of LABELS, two PNGs each under ``root/img``, the first
    ``test_patients`` in the official test split: the CSV manifest's lines (header first)."""
    (root / "img").mkdir(parents=True)
    rows = ["path,label,patient_id,split"]
    seed = 0
    for label in LABELS:
        for p in range(patients):
            for k in range(2):
                seed += 1
                name = f"img/{label}_{p}_{k}.png"
                cv2.imwrite(str(root / name), radiograph(seed))
                rows.append(f"{name},{label},{label[0]}{p},{'test' if p < test_patients else 'train'}")
    return rows
