"""A synthetic CT set in DICOM, for trying the ``dicom`` layout without a PACS export (``cass data demo --dicom``).

Two classes of chest-like CT slices in Hounsfield units (signed 16-bit, rescale intercept -1024): ``normal`` and
``lesion`` (a calcified nodule inside a lung). Each synthetic patient has three slices, in
``<class>/<PatientID>/IM000<n>.dcm``: the patient's ID is in the path on purpose, as in many PACS exports, and
every identifying attribute holds a synthetic value, so that a run shows none of them reaching a record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("lesion", "normal")
SLICES_PER_PATIENT = 3
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_dicom(path: Path, pixels: np.ndarray, *, syntax: str | None = None, **attributes: Any) -> Path:
    """Write ``pixels`` as a DICOM file with ``attributes`` (keywords); the image attributes follow from the
    array (``MONOCHROME2`` for 2-D arrays, ``RGB`` for (H, W, 3) uint8, frames for 3-D greyscale) unless given.
    ``syntax``: a transfer syntax UID (explicit VR little endian by default; RLE Lossless is encoded)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    syntax = syntax or ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = attributes.get("SOPClassUID", CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = attributes.get("SOPInstanceUID") or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    ds.Rows, ds.Columns = (pixels.shape[1:3] if frames > 1 else pixels.shape[:2])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif syntax != ExplicitVRLittleEndian:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([ds.PixelData])  # labelled compressed; only a decoder would find out
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_slice(lesion: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """A chest-like CT slice in stored values (HU + 1024): body, two lungs, noise, and maybe a nodule."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    hu = np.full((size, size), -1000.0)
    hu[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.38) ** 2 <= 1] = 40.0
    for cx in (0.32, 0.68):
        hu[((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2 <= 1] = -820.0
    if lesion:
        cx, cy = rng.choice([0.32, 0.68]) + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.12, 0.12)
        r = rng.uniform(0.1, 0.13)
        hu[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = rng.uniform(400, 800)  # a calcified nodule
    hu += rng.normal(0, 15, hu.shape)
    return np.clip(np.round(hu + 1024), 0, 4095).astype(np.int16)


def generate_dicom_demo(root: Path, images_per_class: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write the synthetic CT set under ``root`` (files already there are overwritten)."""
    rng = np.random.default_rng(seed)
    patient = 0
    for label in CLASSES:
        for i in range(images_per_class):
            if i % SLICES_PER_PATIENT == 0:
                patient += 1
            pid = f"DEMO{patient:04d}"
            write_dicom(
                Path(root) / label / pid / f"IM{i % SLICES_PER_PATIENT + 1:04d}.dcm",
                ct_slice(label == "lesion", size, rng),
                Modality="CT", Manufacturer=("Acme", "Globex")[patient % 2], BodyPartExamined="CHEST",
                PatientName=f"SYNTHETIC^PATIENT^{patient:04d}", PatientID=pid, PatientBirthDate="19700101",
                PatientSex="MF"[patient % 2], PatientAge=f"{40 + patient % 40:03d}Y",
                AccessionNumber=f"ACC{patient:06d}", StudyDate="20240102", StudyInstanceUID=f"1.2.826.0.1.{patient}",
                RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400, PixelSpacing=[0.7, 0.7],
                BitsStored=12, HighBit=11,
            )
    return Path(root)
