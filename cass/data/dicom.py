"""DICOM files as a radiologist sees them: decoded, rescaled, windowed and converted to 8-bit, PHI left behind.

:func:`cass.data.images.decode_image` hands every DICOM file (``DICM`` at byte 128) to :func:`decode_dicom`, so
preparation, the served model and ``cass predict`` share one pixel pipeline; its settings (``data.dicom``) travel
with a fine-tuned classifier in its spec. The pipeline, in the order of the standard (PS3.3 C.7.6.3, C.11):

1. decode the pixel data (native, or compressed where an installed pydicom decoder supports the transfer syntax;
   RLE Lossless and Pillow's JPEG / JPEG 2000 always are), one frame of a multi-frame file by ``data.dicom.frame``
   or refused with the reason;
2. honour *bits stored* (the unused high bits of each sample are masked, signed samples sign-extended);
3. greyscale: the modality rescale (slope, intercept or a modality LUT: HU for CT), then a VOI window (the file's
   own, a named preset, a manual one, or min..max) to 0..255, and MONOCHROME1 inverted so that bone is white;
4. colour (RGB, YBR_*, PALETTE COLOR): converted to 8-bit RGB.

Only the attributes listed in ``SUBGROUP_ATTRIBUTES`` and ``GATE_ATTRIBUTES`` are read into records (none names a
patient; the age becomes a decade band). pydicom's warnings and log lines can quote element values, so reading is
silenced (:func:`_quiet`). docs/dicom.md lists every attribute read and why.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cass.data.dicom_presets import WINDOW_PRESETS
from cass.data.image_errors import CORRUPT, NOT_AN_IMAGE, TOO_LARGE, ImageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from cass.config import DicomConfig

# Kinds of unusable DICOM file, as the one-pass report groups them (cass.data.problems).
NO_PIXELS = "DICOM without pixel data"
NOT_IMAGE_SOP = "DICOM object that is not an image"
UNSUPPORTED_SYNTAX = "DICOM transfer syntax without an installed decoder"
MULTIFRAME = "multi-frame DICOM (no frame chosen)"
UNSUPPORTED_PIXELS = "DICOM pixels cass cannot convert"

PREAMBLE = 128
MAGIC = b"DICM"

# Non-image storage classes met in PACS exports: reports, presentation states, key objects, documents.
NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.")
SUBGROUP_ATTRIBUTES = ("Modality", "Manufacturer", "ManufacturerModelName", "PatientSex", "BodyPartExamined")
"""Read for subgroup metrics (data.group_columns); PatientAge is read only to become ``age_band``."""
GATE_ATTRIBUTES = ("PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "BurnedInAnnotation")
"""Read for the data gate (cass.quality.dicom_suite), with PixelSpacing / ImagerPixelSpacing and the syntax."""
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return data[PREAMBLE:PREAMBLE + 4] == MAGIC


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom's warnings and log lines can quote element values (a malformed birth date, a name): keep them
    from the console and from every log a caller records."""
    logger = logging.getLogger("pydicom")
    level, logger.level = logger.level, logging.CRITICAL + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_dataset(data: bytes, where: str) -> Dataset:
    """Parse a DICOM file (every element, pixel data undecoded); an :class:`ImageError` naming ``where``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with _quiet():
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.get("PixelData")  # a value cut short by the end of the file fails here, not later
        except InvalidDicomError:
            raise ImageError(where, "not a DICOM file pydicom can read; replace it or remove it",
                             NOT_AN_IMAGE) from None
        except Exception:
            raise ImageError(where, "the DICOM file is truncated or corrupt; replace it", CORRUPT) from None
    return ds


def frames(ds: Dataset) -> int:
    """How many frames a dataset holds (1 when NumberOfFrames is absent or unreadable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def check_dataset(ds: Dataset, where: str, max_pixels: int, frame: int | None) -> None:
    """Refuse what cannot become an image, before any pixel is decoded: the kind of fault and what to do."""
    from pydicom.pixels import get_decoder

    sop = str(ds.get("SOPClassUID", ""))
    if "PixelData" not in ds:
        if sop.startswith(NON_IMAGE_SOP_PREFIXES) or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            name = getattr(ds.get("SOPClassUID"), "name", sop) or "unknown"
            raise ImageError(where, f"its SOP class ({name}) holds no image; remove it from the image folders",
                             NOT_IMAGE_SOP)
        raise ImageError(where, "has no pixel data (a header-only or non-image DICOM object); remove it", NO_PIXELS)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ImageError(where, "has no transfer syntax in its file meta information; re-export it", CORRUPT)
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError, KeyError):
            available = False
        if not available:
            raise ImageError(
                where,
                f"is compressed with {syntax.name} ({syntax}), which no installed decoder reads; install one "
                "pydicom supports for it (pylibjpeg with its plugins, or python-gdcm) or convert the files to an "
                "uncompressed syntax (e.g. dcmdjpeg / gdcmconv --raw)",
                UNSUPPORTED_SYNTAX,
            )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageError(where, f"declares {rows} x {cols} pixels; the header is damaged, re-export the file", CORRUPT)
    if rows * cols > max_pixels:
        raise ImageError(where, f"{cols}x{rows} = {rows * cols:,} pixels exceeds data.max_image_pixels "
                                f"({max_pixels:,}); refused before decoding", TOO_LARGE)
    count = frames(ds)
    if count > 1 and frame is None:
        raise ImageError(
            where,
            f"holds {count} frames and a network sees one image; set data.dicom.frame to the frame to use "
            "(0-based), or export the series as single-frame files",
            MULTIFRAME,
        )
    if frame is not None and frame >= count:
        raise ImageError(where, f"holds {count} frame(s); data.dicom.frame {frame} is past the last", MULTIFRAME)
    if not syntax.is_compressed:
        expected = rows * cols * count * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.get("BitsAllocated", 8))
        if len(ds.PixelData) * 8 < expected:
            raise ImageError(where, f"its pixel data holds {len(ds.PixelData):,} bytes of the {expected // 8:,} its "
                                    "header declares: the file is truncated; replace it", CORRUPT)


def _bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Only the low *bits stored* bits of each sample carry the value (overlays once lived in the others)."""
    stored, allocated = int(ds.get("BitsStored", 0) or 0), int(ds.get("BitsAllocated", 0) or 0)
    if arr.dtype.kind not in "iu" or not 0 < stored < allocated:
        return arr
    wide = arr.astype(np.int64)
    masked = wide & ((1 << stored) - 1)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        masked = np.where(masked >= 1 << (stored - 1), masked - (1 << stored), masked)
    return masked


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The linear VOI function of PS3.3 C.11.2.1.2.1, to 0..255."""
    width = max(width, 1.0)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    scaled = ((values - (center - 0.5)) / max(width - 1, 1.0) + 0.5) * 255.0
    return np.where(values <= low, 0.0, np.where(values > high, 255.0, scaled))


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo) * 255.0


def _first(value: Any) -> float | None:
    """The first of a possibly multi-valued number (WindowCenter may list several windows)."""
    if value is None:
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _greyscale(arr: np.ndarray, ds: Dataset, settings: DicomConfig | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    window = settings.window if settings is not None else "file"
    if settings is not None and window == "manual":
        out = _window(values, float(settings.window_center or 0.0), float(settings.window_width or 1.0))
    elif window in WINDOW_PRESETS:
        out = _window(values, *WINDOW_PRESETS[window])
    elif window == "file" and _first(ds.get("WindowWidth")) and _first(ds.get("WindowCenter")) is not None:
        center, width = _first(ds.get("WindowCenter")) or 0.0, _first(ds.get("WindowWidth")) or 1.0
        if str(ds.get("VOILUTFunction", "")).strip().upper() == "SIGMOID":  # PS3.3 C.11.2.1.3.1
            out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        else:
            out = _window(values, center, width)
    elif window == "file" and "VOILUTSequence" in ds:
        out = _minmax(np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64))
    else:
        out = _minmax(values)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255.0 - out  # MONOCHROME1: the lowest value is white
    return np.round(out).astype(np.uint8)


def _colour(arr: np.ndarray, ds: Dataset, where: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if str(ds.PhotometricInterpretation).strip() == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(where, f"colour pixels of shape {arr.shape} are not one RGB image", UNSUPPORTED_PIXELS)
    if arr.dtype == np.uint8:
        return arr
    top = float((1 << int(ds.get("BitsStored", 16) or 16)) - 1) if arr.dtype.kind in "iu" else float(arr.max() or 1)
    if str(ds.PhotometricInterpretation).strip() == "PALETTE COLOR":
        top = 65535.0 if arr.max() > 255 else 255.0
    return np.round(np.clip(arr.astype(np.float64) / top * 255.0, 0, 255)).astype(np.uint8)


def decode_dicom(data: bytes, where: str, max_pixels: int, settings: DicomConfig | None = None) -> Image.Image:
    """The 8-bit image (``L`` or ``RGB``) a DICOM file shows; an :class:`ImageError` with its kind otherwise.
    Without ``settings``, the defaults of ``data.dicom``: the file's own window, multi-frame files refused."""
    ds = read_dataset(data, where)
    frame = settings.frame if settings is not None and frames(ds) > 1 else None
    check_dataset(ds, where, max_pixels, frame)
    from pydicom.pixels import pixel_array

    with _quiet():
        try:
            arr = pixel_array(ds, index=frame)
        except Exception as exc:
            syntax = ds.file_meta.TransferSyntaxUID
            raise ImageError(where, f"its {syntax.name} pixel data does not decode ({type(exc).__name__}); the file "
                                    "is damaged, replace it", CORRUPT) from None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in COLOUR:
        return Image.fromarray(_colour(arr, ds, where), mode="RGB")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or arr.ndim != 2:
        raise ImageError(where, f"photometric interpretation {photometric or '(none)'} with pixels of shape "
                                f"{arr.shape} is not one greyscale or colour image", UNSUPPORTED_PIXELS)
    return Image.fromarray(_greyscale(_bits_stored(arr, ds), ds, settings), mode="L")


# --------------------------------------------------------------------------------------------------
# The attributes records may hold


@dataclass(frozen=True)
class Header:
    """What cass keeps of one file's header: nothing that names a patient or a date."""

    patient_id: str  # only ever turned into a pseudonym (cass.data.pseudonyms), never written
    attributes: dict[str, str]  # SUBGROUP_ATTRIBUTES, age_band, GATE_ATTRIBUTES, pixel_spacing, transfer_syntax


def age_band(age: str) -> str:
    """``PatientAge`` (``045Y``, ``006M``) as a decade band (``40-49``), so no record holds an exact age."""
    text = str(age or "").strip().upper()
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in "DWMY":
        return ""
    years = int(text[:3]) if text[3] == "Y" else 0
    return "90+" if years >= 90 else f"{years // 10 * 10}-{years // 10 * 10 + 9}"


def _spacing(ds: Dataset) -> str:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                return f"{float(value[0]):g}\\{float(value[1]):g}"
        except (TypeError, ValueError):
            return ""
    return ""


def header(ds: Dataset) -> Header:
    """The pseudonymisable patient ID and the record-safe attributes of a parsed dataset."""
    with _quiet():
        attrs = {k: str(ds.get(k, "") or "").strip() for k in (*SUBGROUP_ATTRIBUTES, *GATE_ATTRIBUTES)}
        attrs["NumberOfFrames"] = str(frames(ds))
        attrs["age_band"] = age_band(ds.get("PatientAge", ""))
        attrs["pixel_spacing"] = _spacing(ds)
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        attrs["transfer_syntax"] = getattr(syntax, "name", "") if syntax is not None else ""
        return Header(str(ds.get("PatientID", "") or "").strip(), attrs)
