"""The faults of an unusable image file, by kind: shared by the image readers (cass.data.images) and the DICOM
reader (cass.data.dicom), so that the one-pass report (cass.data.problems) groups them alike."""

from __future__ import annotations

from cass.errors import DataError

# Kinds of unusable file, as reports group them (cass.data.problems).
NOT_FOUND = "file not found"
UNREADABLE = "unreadable file"
EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
TOO_LARGE = "too many pixels (possible decompression bomb)"
CORRUPT = "truncated or corrupt image"


class ImageError(DataError):
    """A file the loader cannot use. ``kind`` (one of the constants above) groups it with its like in a report."""

    def __init__(self, where: str, problem: str, kind: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.kind = kind
