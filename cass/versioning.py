"""Data versioning with DVC: the dataset in ``data.dvc``, the S3 remote, push/pull and cache checks.

DVC is driven through its command line, the interface it keeps stable across releases. What this
module adds around it is what a user otherwise finds out the hard way:

- ``track_dataset`` brings a dataset under DVC in ``data.dvc`` and points ``params.yaml`` at it, so
  ``dvc repro`` builds from it; nothing is left half-done when a step fails.
- ``push``/``pull`` first check that a remote is configured and its endpoint answers (retrying), so the
  user gets one clear message instead of a stack trace after a long timeout.
- ``verify_cache`` re-hashes the cache objects that ``data.dvc`` and ``dvc.lock`` refer to. DVC trusts a
  cache file whose size and mtime did not change, so a file corrupted in place would otherwise be
  checked out or pushed silently; ``push`` refuses to send one and ``pull`` replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from cass.errors import DataError, VersioningError
from cass.io import atomic_write_text

log = logging.getLogger(__name__)

DATA_DVC = "data.dvc"
LOCK_FILE = "dvc.lock"
DEFAULT_REMOTE = "store"
AWS_S3_ENDPOINT = "https://s3.amazonaws.com"
# Keys that describe one particular dataset; `track_dataset` drops them unless they are given again. (The
# registered layouts' own settings, cass.data.layouts, are among them: see `_dataset_keys`.)
# The previous dataset's subgroup columns and groups file describe its images, not the new one's.
DATASET_KEYS = (
    "csv", "medmnist_file", "group_column", "group_columns", "groups_file", "groups_key", "classes", "dicom",
)


def _dataset_keys() -> tuple[str, ...]:
    from cass.data.layouts import get_layout, layout_names

    layout_keys = [key for name in layout_names() for key in get_layout(name).settings]
    return tuple(dict.fromkeys((*DATASET_KEYS, *layout_keys)))

NO_REMOTE_HELP = """no DVC remote is configured, so there is nowhere to push to or pull from. Configure one:
  cass data remote s3://BUCKET/cass                                   # AWS S3
  cass data remote s3://BUCKET/cass --endpoint-url http://HOST:9000   # MinIO or another S3-compatible store
Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws), or from
`dvc remote modify --local store access_key_id ...`, which stays out of git. See docs/dvc.md."""


# --------------------------------------------------------------------------------------------------
# Running dvc


def dvc_executable() -> str:
    """The ``dvc`` command: on PATH, or beside this interpreter (an unactivated virtual environment)."""
    beside = Path(sys.executable).parent / "dvc"
    found = shutil.which("dvc") or (str(beside) if beside.is_file() else None)
    if found is None:
        raise VersioningError("the `dvc` command was not found; install the project (`make install`) first")
    return found


def project_root(start: str | Path | None = None) -> Path:
    """The DVC project that contains ``start`` (default: the working directory)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise VersioningError(
        f"{here} is not inside a DVC repository (no .dvc/ folder here or above); run the command from the "
        "project root, or set one up there with `git init && dvc init`"
    )


def run_dvc(root: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    log.debug("dvc %s (in %s)", " ".join(args), root)
    try:
        return subprocess.run(
            [dvc_executable(), *args], cwd=root, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise VersioningError(f"`dvc {' '.join(args)}` did not finish within {timeout:.0f} s") from exc


def dvc_message(proc: subprocess.CompletedProcess[str], lines: int = 12) -> str:
    """DVC's own explanation of a failure, without its support banner."""
    text = "\n".join(part for part in (proc.stderr, proc.stdout) if part)
    kept = [
        line.rstrip()
        for line in text.splitlines()
        if line.strip() and "Having any troubles?" not in line and not line.startswith("To enable auto staging")
    ]
    return "\n".join(f"  {line}" for line in kept[-lines:]) or f"  (dvc exited with {proc.returncode})"


def _dvc_checked(root: Path, *args: str, what: str) -> str:
    proc = run_dvc(root, *args)
    if proc.returncode != 0:
        raise VersioningError(f"{what} failed (`dvc {' '.join(args)}`):\n{dvc_message(proc)}")
    return proc.stdout


# --------------------------------------------------------------------------------------------------
# Bringing a dataset under DVC


@dataclass(frozen=True)
class TrackedDataset:
    path: str  # relative to the project root, as written in data.dvc and params.yaml
    md5: str  # the data version
    nfiles: int
    size: int
    images: int
    classes: tuple[str, ...]
    copied: bool
    model_prefix: str = ""  # registered models will be <model_prefix>-cnn / -vit


def dvc_out(dvc_file: Path) -> dict[str, Any]:
    """The single output recorded in a ``.dvc`` file."""
    try:
        doc = yaml.safe_load(dvc_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise VersioningError(f"{dvc_file}: cannot read it ({exc})") from None
    outs = doc.get("outs") or []
    if len(outs) != 1:
        raise VersioningError(f"{dvc_file}: expected one output, found {len(outs)}")
    return dict(outs[0])


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (it names data/<name>)")
    return name


def _list_layout(raw: Mapping[str, Any], source: Path) -> tuple[int, tuple[str, ...]]:
    """Read the dataset as `cass data prepare` will, through its registered layout: every image and label,
    every referenced file checked to exist, nothing decoded or written. Every problem is reported at once."""
    from cass.config import params_from_mapping
    from cass.data.layouts import get_layout
    from cass.data.problems import Problems

    params = params_from_mapping({**raw, "data": {**raw.get("data", {}), "root": str(source)}}, "dataset settings")
    problems = Problems()
    result = get_layout(params.data.layout).list_files(params.data, problems)
    problems.raise_if_any(f"{source}: not added (nothing was copied, tracked or written)")
    if result.rows.empty:
        raise DataError(f"{source}: no images found for layout {params.data.layout!r}")
    return len(result.rows), result.classes


def track_dataset(
    source: str | Path,
    layout: str,
    *,
    name: str | None = None,
    move: bool = False,
    params_file: str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    root: Path | None = None,
) -> TrackedDataset:
    """Version ``source`` in ``data.dvc`` and point ``params.yaml`` (data.name/root/layout) at it.

    A folder inside the project is tracked where it is; one outside is copied (or moved, ``move``) to
    ``data/<name>``. ``overrides`` (``data.csv.file=...``) are written to ``params.yaml`` with it, and
    dataset-specific keys of the previous dataset (``data.csv``, ``data.classes``, ...) are dropped.
    The previous dataset stays on disk and in the DVC cache; ``git log data.dvc`` lists its versions.
    """
    from cass.config import apply_overrides, params_from_mapping, parse_override, read_params_file

    root = project_root(root)
    src = Path(source).expanduser()
    src = (src if src.is_absolute() else Path.cwd() / src).resolve()
    if not src.is_dir():
        raise DataError(f"{source}: not a folder; give the dataset folder (images, CSV or .npz inside it)")
    name = _check_name(name or src.name)
    for text in overrides:
        if parse_override(text)[0][0] != "data":
            raise DataError(f"--set {text}: only data.* settings describe a dataset; set others in params.yaml")
    params_path = Path(params_file)  # like every command: relative to the working directory
    raw = read_params_file(params_path)

    inside = _inside(src, root)
    if inside:
        rel = src.relative_to(root)
        if src == root or rel.parts[0] in (".dvc", ".git", "outputs"):
            raise DataError(f"{src}: cannot track the project root, .dvc/, .git/ or outputs/ as a dataset")
        dest = src
    else:
        dest = root / "data" / name
        if dest.exists():
            raise DataError(f"{dest} already exists; choose another --name or remove it first")
    rel_path = dest.relative_to(root).as_posix()

    data = dict(raw.get("data") or {})
    dataset_keys = _dataset_keys()
    if data.get("root") != rel_path:  # another dataset: its CSV columns, class list... do not apply
        data = {k: v for k, v in data.items() if k not in dataset_keys}
    old_name = str(data.get("name", "demo"))
    data.update(name=name, root=rel_path, layout=layout)
    new_raw = apply_overrides({**raw, "data": data}, overrides)
    mlflow_section = _model_prefix_update(raw, old_name, name)
    if mlflow_section is not None:
        new_raw["mlflow"] = mlflow_section
    checked = params_from_mapping(new_raw, f"{params_path} with the new dataset")  # bad settings: before any copy
    images, classes = _list_layout(new_raw, src)

    copied = False
    if not inside:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            log.info("moving %s to %s", src, dest)
            shutil.move(str(src), str(dest))
        else:
            log.info("copying %s to %s", src, dest)
            staging = dest.with_name(f".{name}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                shutil.copytree(src, staging)
                staging.rename(dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            copied = True

    dvc_file = root / DATA_DVC
    previous = dvc_file.read_text() if dvc_file.is_file() else None
    try:
        if previous is None or dvc_out(dvc_file).get("path") != rel_path:
            atomic_write_text(dvc_file, f"outs:\n- path: {rel_path}\n")
        log.info("hashing %s into the DVC cache", rel_path)
        _dvc_checked(root, "commit", "--force", DATA_DVC, what=f"tracking {rel_path} in {DATA_DVC}")
    except BaseException:
        if previous is None:
            dvc_file.unlink(missing_ok=True)
        else:
            atomic_write_text(dvc_file, previous)
        if copied:
            shutil.rmtree(dest, ignore_errors=True)
        elif move and not inside:
            shutil.move(str(dest), str(src))
        raise
    _write_params(
        params_path,
        data_section=new_raw["data"],
        drop=[k for k in dataset_keys if k not in new_raw["data"]],
        mlflow_section=mlflow_section,
    )
    out = dvc_out(dvc_file)
    return TrackedDataset(
        path=rel_path,
        md5=str(out.get("md5", "")),
        nfiles=int(out.get("nfiles", 0)),
        size=int(out.get("size", 0)),
        images=images,
        classes=tuple(classes),
        copied=copied or (move and not inside),
        model_prefix=checked.mlflow.model_prefix,
    )


def _model_prefix_update(raw: Mapping[str, Any], old_name: str, new_name: str) -> dict[str, Any] | None:
    """Registered model names must follow the dataset, or a new dataset's model becomes a version of the old
    one's. ``mlflow.model_prefix: auto`` (the default) does that; a prefix spelled as the old dataset's auto
    value (``cass-demo``) is turned into ``auto`` (returned: the new mlflow section); any other prefix was
    chosen on purpose and is kept, with a warning."""
    section = dict(raw.get("mlflow") or {})
    prefix = section.get("model_prefix", "auto")
    if prefix == "auto" or new_name == old_name:
        return None
    if prefix == f"cass-{old_name}":
        log.warning("mlflow.model_prefix %s named the models of dataset %r; set to auto (cass-%s)", prefix,
                    old_name, new_name)
        section["model_prefix"] = "auto"
        return section
    log.warning(
        "mlflow.model_prefix is %r (set in params.yaml), so the models of dataset %r are registered as %s-cnn / "
        "%s-vit like those of the previous dataset %r; set mlflow.model_prefix: auto to name them cass-%s-*",
        prefix, new_name, prefix, prefix, old_name, new_name,
    )
    return None


def _write_params(
    path: Path, data_section: Mapping[str, Any], drop: Iterable[str], mlflow_section: Mapping[str, Any] | None = None
) -> None:
    """Update the ``data`` section (and ``mlflow.model_prefix``) of params.yaml in place, keeping its comments."""
    import io

    from ruamel.yaml import YAML  # installed with dvc, which edits params.yaml the same way for `exp run -S`

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    if doc.get("data") is None:
        doc["data"] = {}
    section = doc["data"]
    changes = [key for key in drop if key in section]
    changes += [key for key, value in data_section.items() if section.get(key) != value]
    prefix = (mlflow_section or {}).get("model_prefix")
    if prefix is not None:
        if doc.get("mlflow") is None:
            doc["mlflow"] = {}
        if doc["mlflow"].get("model_prefix") != prefix:
            doc["mlflow"]["model_prefix"] = prefix
            changes.append("mlflow.model_prefix")
    if not changes:
        return
    for key in drop:
        section.pop(key, None)
    for key, value in data_section.items():
        if section.get(key) != value:
            section[key] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Remote


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint_url: str | None  # None: the AWS default endpoint

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def describe(self) -> str:
        where = f", endpoint {self.endpoint_url}" if self.endpoint_url else (", AWS S3" if self.is_s3 else "")
        return f"remote '{self.name}' ({self.url}{where})"


def dvc_config(root: Path) -> dict[str, str]:
    """The merged DVC configuration (system, global, repository and the uncommitted local file)."""
    text = _dvc_checked(root, "config", "--list", what="reading the DVC configuration")
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def get_remote(root: Path, name: str | None = None) -> Remote:
    """The named remote, or the default one; a clear error when there is none."""
    cfg = dvc_config(root)
    known = sorted({k.split(".")[1] for k in cfg if k.startswith("remote.") and k.endswith(".url")})
    name = name or cfg.get("core.remote")
    if not name:
        if known:
            raise VersioningError(
                f"no default DVC remote; choose one of {known} with `dvc remote default NAME` or pass --remote NAME"
            )
        raise VersioningError(NO_REMOTE_HELP)
    url = cfg.get(f"remote.{name}.url")
    if not url:
        raise VersioningError(f"DVC remote {name!r} is not configured (configured: {known or 'none'})")
    endpoint = cfg.get(f"remote.{name}.endpointurl") or (_env_endpoint() if url.startswith("s3://") else None)
    return Remote(name, url, endpoint)


def configure_remote(
    url: str,
    *,
    name: str = DEFAULT_REMOTE,
    endpoint_url: str | None = None,
    region: str | None = None,
    local: bool = False,
    root: Path | None = None,
) -> Remote:
    """Add (or replace) the default remote. ``local`` keeps it in .dvc/config.local, out of git.

    Credentials are never written here: DVC's S3 client reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    (or ~/.aws, or an instance role), or ``dvc remote modify --local NAME access_key_id ...``.
    """
    root = project_root(root)
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise VersioningError(f"{url!r}: give an S3 URL, s3://BUCKET/PATH (MinIO too, with --endpoint-url)")
    if endpoint_url is not None:
        ep = urlparse(endpoint_url)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise VersioningError(f"--endpoint-url {endpoint_url!r}: give http(s)://HOST[:PORT]")
    level = ["--local"] if local else []
    _dvc_checked(root, "remote", "add", *level, "--default", "--force", name, url, what=f"adding remote {name!r}")
    # Re-hash what is downloaded: an object damaged in the bucket or on the way is rejected, not checked out.
    _dvc_checked(root, "remote", "modify", *level, name, "verify", "true", what="enabling download verification")
    for key, value in (("endpointurl", endpoint_url), ("region", region)):
        if value:
            _dvc_checked(root, "remote", "modify", *level, name, key, value, what=f"setting {key} of {name!r}")
    return get_remote(root, name)


def check_endpoint(remote: Remote, attempts: int = 3, delay: float = 1.0, timeout: float = 5.0) -> None:
    """Fail fast, naming the endpoint, when the S3 server does not accept connections."""
    if not remote.is_s3:
        return
    endpoint = remote.endpoint_url or AWS_S3_ENDPOINT
    parsed = urlparse(endpoint)
    host = parsed.hostname
    if parsed.scheme not in ("http", "https") or not host:
        raise VersioningError(f"{remote.describe()}: endpoint URL {endpoint!r} is not http(s)://HOST[:PORT]")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    last: OSError | None = None
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as exc:
            last = exc
            log.warning("S3 endpoint %s not reachable (attempt %d/%d): %s", endpoint, attempt, attempts, exc)
            if attempt < attempts:
                time.sleep(delay * 2 ** (attempt - 1))
    raise VersioningError(
        f"S3 endpoint {endpoint} is unreachable ({last}; tried {attempts} times) for {remote.describe()}. "
        "Check that the server is running and the address is right: `dvc remote modify [--local] "
        f"{remote.name} endpointurl URL`, or AWS_ENDPOINT_URL."
    )


# --------------------------------------------------------------------------------------------------
# Cache verification


@dataclass(frozen=True)
class CacheReport:
    checked: int  # cache objects re-hashed
    missing: int  # referenced but not in the local cache (`dvc pull` fetches them)
    corrupted: tuple[str, ...]  # "workspace path (cache object)" of each object whose content ≠ its md5
    removed: bool

    @property
    def ok(self) -> bool:
        return not self.corrupted


def cache_dir(root: Path) -> Path:
    return Path(_dvc_checked(root, "cache", "dir", what="locating the DVC cache").strip())


def dvc_tracked_outputs(root: Path) -> Iterator[tuple[str, str]]:
    """(workspace path, md5) of every output recorded in ``*.dvc`` files at the root and in ``dvc.lock``."""
    for dvc_file in sorted(p for p in root.glob("*.dvc") if p.is_file()):
        doc = yaml.safe_load(dvc_file.read_text()) or {}
        for out in doc.get("outs") or []:
            if out.get("md5") and out.get("hash") == "md5":
                yield str(out["path"]), str(out["md5"])
    lock = root / LOCK_FILE
    if lock.is_file():
        doc = yaml.safe_load(lock.read_text()) or {}
        for stage in (doc.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                if out.get("md5") and out.get("hash") == "md5":
                    yield str(out["path"]), str(out["md5"])


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_cache(root: Path | None = None, *, remove: bool = False) -> CacheReport:
    """Re-hash every cache object the project refers to; with ``remove``, delete the corrupted ones.

    A removed object is fetched again by ``dvc pull`` (or re-added from an intact workspace copy by
    ``dvc commit --force``).
    """
    root = project_root(root)
    cache = cache_dir(root)
    wanted: dict[str, str] = {}  # md5 -> workspace path, one check per object
    missing = 0
    for path, md5 in dvc_tracked_outputs(root):
        if not md5.endswith(".dir"):
            wanted.setdefault(md5, path)
            continue
        listing = _object(cache, md5)
        if not listing.is_file():
            missing += 1
            continue
        wanted.setdefault(md5, path + "/")
        try:
            entries = json.loads(listing.read_text())
        except (OSError, ValueError):
            continue  # its md5 check below reports it
        for entry in entries:
            wanted.setdefault(str(entry["md5"]), f"{path}/{entry['relpath']}")

    present = {md5: path for md5, path in wanted.items() if _object(cache, md5).is_file()}
    missing += len(wanted) - len(present)

    def damaged(md5: str) -> bool:
        return _md5(_object(cache, md5)) != md5.removesuffix(".dir")

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bad = [md5 for md5, flag in zip(present, pool.map(damaged, present), strict=True) if flag]
    corrupted = tuple(sorted(f"{present[md5]} ({_object(cache, md5)})" for md5 in bad))
    if bad and remove:
        for md5 in bad:
            _object(cache, md5).unlink(missing_ok=True)
        log.warning("removed %d corrupted cache object(s): %s", len(bad), ", ".join(corrupted[:5]))
    return CacheReport(checked=len(present), missing=missing, corrupted=corrupted, removed=remove and bool(corrupted))


def corruption_message(report: CacheReport, action: str) -> str:
    shown = "\n".join(f"  - {c}" for c in report.corrupted[:10])
    more = f"\n  ... and {len(report.corrupted) - 10} more" if len(report.corrupted) > 10 else ""
    return (
        f"{action}: {len(report.corrupted)} DVC cache object(s) do not match their md5:\n{shown}{more}\n"
        "Repair: `cass data verify --remove`, then `dvc commit --force` where the workspace copy is intact "
        "or `cass data pull` to fetch a good copy from the remote."
    )


# --------------------------------------------------------------------------------------------------
# Push and pull


def push(
    targets: Sequence[str] = (),
    *,
    remote: str | None = None,
    jobs: int | None = None,
    verify: bool = True,
    root: Path | None = None,
) -> str:
    """``dvc push`` after checking the remote, its endpoint and (``verify``) the cache; returns DVC's summary."""
    root = project_root(root)
    r = get_remote(root, remote)
    check_endpoint(r)
    report = verify_cache(root) if verify else None
    if report is not None and not report.ok:
        raise VersioningError(corruption_message(report, f"refusing to push to {r.describe()}"))
    log.info("pushing to %s", r.describe())
    args = ["push", "--remote", r.name, *(["--jobs", str(jobs)] if jobs else []), *targets]
    return _dvc_checked(root, *args, what=f"pushing to {r.describe()}").strip()


def pull(
    targets: Sequence[str] = (),
    *,
    remote: str | None = None,
    jobs: int | None = None,
    verify: bool = True,
    root: Path | None = None,
) -> str:
    """``dvc pull`` after checking the remote; (``verify``) corrupted cache objects are replaced by the remote's."""
    root = project_root(root)
    r = get_remote(root, remote)
    check_endpoint(r)
    if verify:
        verify_cache(root, remove=True)  # a corrupted object is deleted, so that `dvc pull` fetches it again
    args = ["pull", "--remote", r.name, *(["--jobs", str(jobs)] if jobs else []), *targets]
    summary = _dvc_checked(root, *args, what=f"pulling from {r.describe()}").strip()
    after = verify_cache(root) if verify else None
    if after is not None and not after.ok:
        raise VersioningError(corruption_message(after, f"the copy pulled from {r.describe()} is damaged"))
    return summary
