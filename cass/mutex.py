"""A mutual-exclusion lock shared by every process that talks to one MLflow tracking server.

The lock is a registered model whose name is the lock's, created and deleted around the block it guards:
creating a registered model is atomic in every MLflow backend (a unique name in the database behind the
server), so exactly one process holds it; the others wait. Its tags say who holds it (``owner`` token,
``acquired_at``, host, pid and the pid's start time, PID namespace and boot).

A waiter breaks a lock at once when its holder ran on the same host, in the same PID namespace since the
same boot (containers sharing a host name do not share pids), and that process is gone; else when it is
older than ``stale_s``. Exactly one waiter breaks a given lock: it first creates the marker
``<lock>.broken-<owner>`` (atomic like the lock), and the next waiter that breaks a lock deletes the markers
older than ``stale_s`` (and a minute).

The promotion of a registered model holds one (:func:`cass.registry.promotion_lock`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from cass.errors import CassError

log = logging.getLogger(__name__)


class LockTimeout(CassError):
    """The lock stayed held by another live process for longer than the caller would wait."""


@contextlib.contextmanager
def registered_model_lock(client, lock: str, *, timeout_s: float, stale_s: float, held_by: str,
                          description: str = "") -> Iterator[None]:
    """Hold ``lock`` (an atomically created registered model) for the block; wait at most ``timeout_s``.

    ``held_by`` names the other holder in the timeout's message (``another promotion of m``); ``description``
    is the lock's, shown by MLflow while it is held."""
    from mlflow.exceptions import MlflowException

    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"owner": token, "acquired_at": f"{time.time():.3f}", **holder()}, description=description,
            )
            break
        except MlflowException as exc:
            # ALREADY_EXISTS: someone holds it. DOES_NOT_EXIST: the store saw it taken, then looked it up after
            # its holder had released it (SQL stores read the existing model back when the insert collides).
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        break_if_stale(client, lock, stale_s)
        if time.monotonic() > deadline:
            raise LockTimeout(
                f"{held_by} has held {lock} for over {timeout_s:g} s; retry later, or delete the registered model "
                f"'{lock}' if none is running"
            )
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("owner") == token:
                client.delete_registered_model(lock)


def holder() -> dict[str, str]:
    """Who holds a lock: host and pid, the process's start time so that a reused pid is not mistaken for it,
    and the PID namespace and boot the pid belongs to (:func:`_pid_space`)."""
    pid = os.getpid()
    return {"holder": f"{socket.gethostname()}:{pid}", "host": socket.gethostname(), "pid": str(pid),
            "started": _process_start(pid) or "", **_pid_space()}


def _pid_space() -> dict[str, str]:
    """Where this process's pid is meaningful: the inode of its PID namespace and the kernel's boot id ("" when
    unreadable). Containers that share a host name (host networking) have their own PID namespaces."""
    space = {"pid_ns": "", "boot_id": ""}
    with contextlib.suppress(OSError):
        space["pid_ns"] = str(os.stat("/proc/self/ns/pid").st_ino)
    with contextlib.suppress(OSError):
        space["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return space


def _same_pid_space(tags: Mapping[str, str]) -> bool:
    """Whether the pid in a lock's ``tags`` can be looked up here: same PID namespace and same boot, both known.
    A lock written without them (by an earlier version) is not judged by its pid. Without /proc (no PID
    namespaces: macOS), the host name is enough."""
    if not Path("/proc/self/stat").exists():
        return True
    here = _pid_space()
    return all(here.values()) and all(tags.get(key) == value for key, value in here.items())


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot, from /proc); None when it is gone or a zombie.
    "" where /proc is not there (then only whether the pid exists is known)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return ""
        return None
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _holder_gone(tags: Mapping[str, str]) -> bool:
    """True when the lock's holder ran on this host, in this PID namespace since this boot, and that process no
    longer exists (killed, crashed)."""
    if tags.get("host") != socket.gethostname() or not str(tags.get("pid", "")).isdigit():
        return False
    if not _same_pid_space(tags):
        return False
    started = _process_start(int(tags["pid"]))
    return started is None or bool(started and tags.get("started") and started != tags["started"])


def break_if_stale(client, lock: str, stale_s: float) -> None:
    """Delete a lock whose holder is gone (same host, PID namespace and boot) or that is older than ``stale_s``.

    Exactly one waiter breaks a given lock: it must first create ``<lock>.broken-<owner>`` (atomic, like the lock
    itself), so a second waiter that saw the same dead lock cannot delete the fresh lock of a third process."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    held = model.tags
    # A lock read between its creation and its tags has none yet: its age is the registered model's own.
    acquired = float(held.get("acquired_at") or (model.creation_timestamp or 0) / 1000 or time.time())
    age = time.time() - acquired
    if age <= stale_s and not _holder_gone(held):
        return
    owner = held.get("owner", "")
    try:
        client.create_registered_model(
            f"{lock}.broken-{owner[:16]}", tags={"broken_at": f"{time.time():.3f}", "broken_holder":
                                                 held.get("holder", "?"), **holder()},
            description=f"Marks the lock of {held.get('holder', '?')} as broken; deleted once stale itself.",
        )
    except MlflowException:
        return  # another waiter breaks it
    log.warning("breaking the lock %s left by %s (%s)", lock, held.get("holder", "?"),
                f"held {age:.0f} s" if age > stale_s else "that process is gone")
    with contextlib.suppress(MlflowException):
        if client.get_registered_model(lock).tags.get("owner") == owner:
            client.delete_registered_model(lock)
    with contextlib.suppress(MlflowException):
        for marker in client.search_registered_models(f"name LIKE '{lock}.broken-%'"):
            if time.time() - float(marker.tags.get("broken_at", "0") or 0) > max(stale_s, 60.0):
                client.delete_registered_model(marker.name)
