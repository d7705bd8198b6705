"""S3 access through boto3, configured from the environment (never from files in git).

``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points boto3 at MinIO or a local endpoint;
credentials come from the usual AWS variables or instance roles.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from cass.errors import CassError


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise CassError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client():  # -> botocore client; boto3 is imported here so `import cass` stays light
    import boto3
    from botocore.config import Config

    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 5, "mode": "standard"},
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def cache_dir() -> Path:
    return Path(os.environ.get("CASS_CACHE_DIR", Path.home() / ".cache" / "cass"))


def download(uri: str, dest: Path | None = None) -> Path:
    """Download ``s3://bucket/key`` to ``dest`` (default: a cache file keyed by the URI)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    if dest is None:
        name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + Path(key).name
        dest = cache_dir() / "s3" / name
        if dest.is_file():
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        s3_client().download_file(bucket, key, str(tmp))
    except (BotoCoreError, ClientError) as exc:
        tmp.unlink(missing_ok=True)
        raise CassError(f"could not download {uri}: {exc}") from None
    tmp.replace(dest)
    return dest
