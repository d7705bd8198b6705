"""Opening images safely and converting them to 8-bit RGB.

Medical images come as 8-bit RGB, grayscale, RGBA and 16-bit (or float) single-channel files. Every
one is converted to 8-bit RGB before it reaches a network. Images are opened with a pixel-count limit
checked on the header, before any decoding, so a decompression bomb is refused cheaply.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from cass.data.image_errors import (
    CORRUPT,
    EMPTY,
    NOT_AN_IMAGE,
    NOT_FOUND,
    TOO_LARGE,
    UNREADABLE,
    ImageError,
)

if TYPE_CHECKING:
    from cass.config import DicomConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb threshold

@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    width: int
    height: int
    mode: str


def _too_large(where: str, pixels: int, size: str, max_pixels: int) -> ImageError:
    return ImageError(
        where,
        f"{size}{pixels:,} pixels exceeds data.max_image_pixels ({max_pixels:,}); refused as a possible "
        "decompression bomb. Raise data.max_image_pixels only for trusted files.",
        TOO_LARGE,
    )


def decode_image(
    data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, dicom: DicomConfig | None = None
) -> Image.Image:
    """Fully decode image bytes with the bomb check first; ``where`` names the source in errors.

    A DICOM file goes to :func:`cass.data.dicom.decode_dicom` (rescaled, windowed by ``dicom``, 8-bit), so every
    reader of images (preparation, training, the served model, ``cass predict``) shares its pixel pipeline.

    The pixel limit is ``max_pixels`` (``data.max_image_pixels``), not Pillow's global one: Pillow's warning
    threshold is silenced so that raising the setting works, and its hard error (at twice its threshold) is
    reported in the setting's terms.
    """
    if not data:
        raise ImageError(where, "the file is empty (0 bytes); replace it or remove its row", EMPTY)
    from cass.data.dicom import decode_dicom, is_dicom

    if is_dicom(data):
        return decode_dicom(data, where, max_pixels, dicom)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        problem = "not an image file Pillow can read; replace it or remove its row"
        raise ImageError(where, problem, NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError) as exc:  # a header cut short (JPEG: "Truncated File Read")
        raise ImageError(where, f"the image is truncated or corrupt ({exc}); replace the file", CORRUPT) from None
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else 0
        if pixels > max_pixels or not found:
            raise _too_large(where, pixels, "", max_pixels) from None
        hard = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(
            where,
            f"{pixels:,} pixels is within data.max_image_pixels ({max_pixels:,}) but above Pillow's hard limit "
            f"({hard:,}, twice PIL.Image.MAX_IMAGE_PIXELS), which no setting of cass raises; downscale the file",
            TOO_LARGE,
        ) from None
    width, height = img.size
    if width * height > max_pixels:
        raise _too_large(where, width * height, f"{width}x{height} = ", max_pixels)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(where, f"the image is truncated or corrupt ({exc}); replace the file", CORRUPT) from None
    return img


def read_bytes(path: Path, where: str | None = None) -> bytes:
    where = where or str(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(where, "file not found; restore it (dvc pull?) or remove its row", NOT_FOUND) from None
    except IsADirectoryError:
        raise ImageError(where, "is a directory, not an image file", NOT_AN_IMAGE) from None
    except PermissionError:
        raise ImageError(where, "permission denied; make the file readable", UNREADABLE) from None
    except OSError as exc:
        raise ImageError(where, f"unreadable ({exc})", UNREADABLE) from None


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, where: str | None = None) -> ImageInfo:
    """Hash and fully decode one file; raise :class:`ImageError` naming the file if it is unusable."""
    where = where or str(path)
    data = read_bytes(path, where)
    img = decode_image(data, where, max_pixels)
    return ImageInfo(hashlib.sha256(data).hexdigest(), img.width, img.height, img.mode)


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image for training or inference as 8-bit RGB."""
    return to_rgb8(decode_image(read_bytes(path), str(path), max_pixels))


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    High-bit-depth single-channel images (16-bit, 32-bit integer, float) are windowed to their own
    min..max range, since medical scanners often use 10-12 of the 16 bits; transparent pixels of RGBA
    images are composited onto black.
    """
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
