"""Pseudonyms: stable, keyed stand-ins for identifiers that must not leave the data folder.

A DICOM set's patient ID decides its split group and its file path keys each image, yet neither may appear in a
manifest, a log or a tracking record. Each is replaced by an HMAC-SHA256 of the value under a secret key, so the
same patient gets the same group in every run (splits are reproducible) while nobody without the key can test a
guessed ID against a pseudonym (a plain hash could be reversed by hashing every plausible ID). The key comes from
the environment (``CASS_PSEUDONYM_KEY``) or a secret file (``CASS_PSEUDONYM_KEY_FILE``, e.g. a mounted
Kubernetes or Docker secret), never from the repository.
"""

from __future__ import annotations

import hmac
import os
from hashlib import sha256
from pathlib import Path

from cass.errors import ConfigError

KEY_VARIABLE = "CASS_PSEUDONYM_KEY"
KEY_FILE_VARIABLE = "CASS_PSEUDONYM_KEY_FILE"
MIN_KEY_LENGTH = 16
LENGTH = 20  # hex characters: 80 bits, no collision in any realistic dataset


class MissingKeyError(ConfigError):
    """No pseudonym key is set (or it is too short to resist guessing)."""


def pseudonym_key() -> bytes:
    """The secret key, from ``CASS_PSEUDONYM_KEY`` or the file ``CASS_PSEUDONYM_KEY_FILE`` names."""
    value = os.environ.get(KEY_VARIABLE, "")
    source = KEY_VARIABLE
    if not value and os.environ.get(KEY_FILE_VARIABLE):
        path = Path(os.environ[KEY_FILE_VARIABLE])
        source = f"{KEY_FILE_VARIABLE} ({path})"
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise MissingKeyError(f"{source}: cannot read the pseudonym key file ({exc.strerror})") from None
    if not value:
        raise MissingKeyError(
            f"{KEY_VARIABLE} is not set: a DICOM dataset's patient IDs and file names are replaced by keyed "
            f"pseudonyms, and the key must come from the environment or a secret, never the repository. Set "
            f"{KEY_VARIABLE} (e.g. `export {KEY_VARIABLE}=$(openssl rand -hex 32)`, kept with the data's other "
            f"secrets) or {KEY_FILE_VARIABLE} to a file holding it; keep it the same for every run on this data"
        )
    if len(value) < MIN_KEY_LENGTH:
        raise MissingKeyError(f"{source}: the pseudonym key has {len(value)} characters; use at least "
                              f"{MIN_KEY_LENGTH} random ones (e.g. `openssl rand -hex 32`)")
    return value.encode()


def pseudonym(value: str, kind: str, key: bytes) -> str:
    """The pseudonym of ``value``; ``kind`` (``patient``, ``image``) keeps equal values of different kinds apart."""
    return hmac.new(key, f"{kind}\0{value}".encode(), sha256).hexdigest()[:LENGTH]
