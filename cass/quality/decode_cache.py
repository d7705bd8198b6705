"""Checking image files in parallel, with decode results cached by content hash.

Every file is read and hashed on every validation (that is how a changed file is noticed); only files whose
sha256 is not in the cache are decoded. "Decodes" means what training needs: the same full decode the
training loader does (:func:`cass.data.images.decode_image`: pixel-count limit on the header, then every
pixel decoded, truncation an error). Pillow's JPEG ``draft`` mode, which decodes at 1/8 scale, is not used:
it skips the inverse DCT and colour conversion, so it proves less than "the loader can read this", and the
full decode is fast enough for small images (see benchmarks/validate_speed.py).

The cache holds successful decodes only (sha256 -> width, height, mode) and is stamped with the Pillow
version and the pixel limit: a different Pillow or limit may decide differently, so the cache is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import PIL

from cass.data.images import decode_image
from cass.io import atomic_write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
Decoded = tuple[int, int, str]  # width, height, mode


class FileCheck(NamedTuple):
    """What one file looked like now. ``exists`` is False for a missing file (or a directory).

    A named tuple, not a dataclass: tens of thousands of them travel back from the worker processes.
    """

    exists: bool
    sha256: str = ""
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    error: str | None = None  # why it does not decode (or cannot be read)
    cached: bool = False


def _stamp(max_pixels: int) -> dict[str, object]:
    return {"format": CACHE_FORMAT, "pillow": PIL.__version__, "max_pixels": max_pixels}


def load_cache(path: Path, max_pixels: int) -> dict[str, Decoded]:
    """Decoded images by sha256; empty when there is no usable cache."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        if raw.get("stamp") != _stamp(max_pixels):
            log.info("decode cache %s was written by another Pillow or pixel limit; decoding again", path)
            return {}
        return {sha: (int(w), int(h), str(m)) for sha, (w, h, m) in raw["images"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable decode cache %s (%s)", path, exc)
        return {}


def save_cache(path: Path, max_pixels: int, images: dict[str, Decoded]) -> None:
    text = json.dumps({"stamp": _stamp(max_pixels), "images": {k: list(v) for k, v in sorted(images.items())}})
    atomic_write_text(path, text + "\n")


# Worker state, set once per process by _init (the cache can hold tens of thousands of entries).
_state: tuple[str, int, dict[str, Decoded]] = ("", 0, {})


def _init(root: str, max_pixels: int, known: dict[str, Decoded]) -> None:
    global _state
    _state = (root, max_pixels, known)


def _check_one(rel: str) -> FileCheck:
    root, max_pixels, known = _state
    try:
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return FileCheck(exists=False)
    except OSError as exc:
        return FileCheck(exists=True, error=f"unreadable ({exc.strerror or exc})")
    sha = hashlib.sha256(data).hexdigest()
    hit = known.get(sha)
    if hit is not None:
        return FileCheck(True, sha, *hit, cached=True)
    try:
        img = decode_image(data, rel, max_pixels)
    except Exception as exc:  # a gate reports every way a file can fail to decode, never crashes on one
        message = str(exc).removeprefix(f"{rel}: ") or type(exc).__name__
        return FileCheck(True, sha, error=message)
    return FileCheck(True, sha, img.width, img.height, img.mode)


def check_files(
    root: Path, rel_paths: Sequence[str], max_pixels: int, cache_path: Path, workers: int = 0
) -> list[FileCheck]:
    """Read, hash and (unless cached) decode every file, in parallel; update the cache."""
    known = load_cache(cache_path, max_pixels)
    workers = workers or os.cpu_count() or 1
    args = (str(root), max_pixels, known)
    if workers == 1 or len(rel_paths) < 64:
        _init(*args)
        try:
            results = [_check_one(rel) for rel in rel_paths]
        finally:
            _init("", 0, {})
    else:
        chunk = max(1, min(256, len(rel_paths) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers, initializer=_init, initargs=args) as pool:
            results = list(pool.map(_check_one, rel_paths, chunksize=chunk))
    decoded = {r.sha256: (r.width, r.height, r.mode) for r in results if r.error is None and r.mode is not None}
    hits = sum(r.cached for r in results)
    log.info("checked %d files under %s: %d decode results from the cache", len(results), root, hits)
    if decoded != known:
        save_cache(cache_path, max_pixels, decoded)  # the files of this run only, so the cache does not grow
    return results
