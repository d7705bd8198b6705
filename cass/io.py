"""Atomic writes: every output of the platform is written through these helpers.

A file (:func:`atomic_path`, :func:`atomic_write_text`): a reader (a later stage, DVC, a crashed run's
resume) sees either the old file or the whole new one, never a part. The content goes to a temporary file
``.<name>.<pid>-<random>.tmp`` in the same folder, which is flushed to disk and replaces the target in one
``os.replace``. A failure removes the temporary file and leaves the target as it was.

A set of files (:func:`output_set`): the outputs of one stage (weights, spec, metrics, curves) belong
together; replacing them one by one would let a kill between two files leave new weights beside the
previous run's metrics. The stage writes its whole set into a staging folder beside its output folder,
which then takes the output folder's place in one rename (``renameat2(RENAME_EXCHANGE)`` on Linux), so
the paths DVC tracks stay the same and a reader sees the previous set or the new one.

A full disk is named as such: :class:`~cass.errors.DiskFullError` (exit 9) with the path, the space the
write needed and the space left; the previous output stays the current one.

Leftovers of killed writes (temporary files, staging folders of a process that is gone) are removed by
:func:`clean_stale`, which the stages call before they write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cass.errors import DiskFullError, exception_chain

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How writers that do not raise OSError report a full disk: safetensors (Rust I/O errors) and torch.save
# (its zip writer checks the position after each write: "unexpected pos").
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "unexpected pos",
                  "file write failed")
_LOW_SPACE = 1 << 20  # "unexpected pos" counts as a full disk only when under 1 MiB is left

# Temporary files and folders carry the writer's pid, so a later run removes only those of dead writers.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]+\.(?P<kind>tmp|staging|old)$")
_LEGACY_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # mkstemp names without a pid (earlier versions)


def _prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def free_bytes(folder: Path) -> int:
    """Space an unprivileged writer may still use on the filesystem of ``folder``."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means that its filesystem is full."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        text = str(e).lower()
        if isinstance(e, OSError | RuntimeError) or type(e).__name__ == "SafetensorError":
            if any(t in text for t in _NO_SPACE_TEXT[:3]):
                return True
            if any(t in text for t in _NO_SPACE_TEXT[3:]) and 0 <= free_bytes(folder) < _LOW_SPACE:
                return True
    return False


def disk_full_error(path: Path, needed: int | None, written: int = 0, previous: str | None = None) -> DiskFullError:
    """The one message of a full disk: where, how much was needed and is left, what was kept, what to do."""
    path = Path(path)
    folder = path.parent
    free = free_bytes(folder)
    need = f"{human_bytes(needed)} needed" if needed else f"more than the {human_bytes(written)} written"
    kept = previous or (f"the previous {path.name} was left as it was" if path.exists()
                        else f"nothing was written to {path}")
    err = DiskFullError(
        f"{path}: the disk is full ({need}, {human_bytes(max(free, 0))} free on the filesystem of {folder}); "
        f"{kept}. Free space there (or point the outputs to another disk) and rerun"
    )
    err.path, err.needed, err.written = path, needed, written  # type: ignore[attr-defined]
    return err


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces ``path`` in one rename.

    ``needed`` (bytes, when the writer knows it) goes into the message of a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc, path.parent)
        written = Path(tmp).stat().st_size if full and Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, needed, written) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, flushed to disk before the rename."""
    data = text.encode()
    with atomic_path(Path(path), needed=len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


# -- sets of outputs -------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` the folder at ``out_dir``; the previous folder ends up at ``staging``'s path."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
    elif not _exchange(staging, out_dir):
        # Two renames: a kill between them leaves the previous set at .<name>.<pid>-x.old, which
        # clean_stale puts back.
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=_prefix(out_dir.name), suffix=".old"))
        os.rmdir(old)
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        os.rename(old, staging)
    with contextlib.suppress(OSError):
        _fsync(out_dir.parent)


def _carry(names: Iterable[str], src: Path, dst: Path) -> None:
    for name in names:
        if (src / name).is_file() and not (dst / name).exists():
            try:
                os.link(src / name, dst / name)  # the same content, no copy (writers replace, never modify)
            except OSError:
                shutil.copy2(src / name, dst / name)


@contextlib.contextmanager
def output_set(out_dir: Path, *, carry: Iterable[str] = ()) -> Iterator[Path]:
    """Publish a stage's outputs together: yield an empty staging folder beside ``out_dir``; when the
    block ends without error, the staging folder becomes ``out_dir`` in one rename, so readers see the
    previous set or the new one, never a mix. Files of the current folder named in ``carry`` (a
    checkpoint another run reads) move on into the new one; everything else of the previous set goes.
    An error (a full disk, an interruption) removes the staging folder and leaves ``out_dir`` as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=_prefix(out_dir.name), suffix=".staging"))
    try:
        try:
            yield staging
        except DiskFullError as exc:  # name the output's own path, not the staging folder's
            path = getattr(exc, "path", None)
            if path is None or not Path(path).is_relative_to(staging):
                raise
            final = out_dir / Path(path).relative_to(staging)
            kept = (f"{out_dir} still holds the previous complete outputs" if out_dir.exists()
                    else f"nothing was written to {out_dir}")
            raise disk_full_error(final, exc.needed, exc.written, previous=kept) from None  # type: ignore[attr-defined]
        _carry(carry, out_dir, staging)
        with contextlib.suppress(OSError):
            _fsync(staging)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the swap: the previous set


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove what killed writers left: temporary files inside the folder ``path`` and staging folders
    of ``path`` beside it, of processes that are gone; put back a previous output set that a kill
    between two renames left aside. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    if path.is_dir():
        for f in path.iterdir():
            m = _LEFTOVER.match(f.name)
            stale = (m and m["kind"] == "tmp" and not _alive(int(m["pid"]))) or _LEGACY_TMP.match(f.name)
            if stale and f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
    if path.parent.is_dir():
        for f in path.parent.iterdir():
            m = _LEFTOVER.match(f.name)
            if not m or m["name"] != path.name or m["kind"] == "tmp" or _alive(int(m["pid"])):
                continue
            if m["kind"] == "old" and not path.exists():
                os.rename(f, path)
                continue
            shutil.rmtree(f, ignore_errors=True)
            removed.append(f)
    return removed
