"""Where a study lives, and what happens when its database goes away.

A study's storage is a SQLite file per network by default, PostgreSQL (or any SQLAlchemy URL) for workers on
several machines. A database that stops answering ends the command with one
:class:`~cass.errors.StudyDatabaseError` (exit 11) naming the storage, never a driver's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from cass.config import Params
from cass.errors import CassError, StudyDatabaseError, exception_chain
from cass.outputs import optuna_storage_file
from cass.redaction import redact

log = logging.getLogger(__name__)

STORAGE_ENV = "CASS_TUNE_STORAGE"


def resolve_storage(params: Params, out_dir: Path, network: str, storage: str | None = None) -> str:
    """The study's database URL: ``storage`` (--storage), then $CASS_TUNE_STORAGE, then tune.storage,
    else a SQLite file per network under ``out_dir``. Keep passwords in the variable, not in params.yaml."""
    url = storage or os.environ.get(STORAGE_ENV) or params.tune.storage
    if url:
        return url
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{optuna_storage_file(out_dir, network).resolve()}"


def database_url(url: str) -> str:
    """``url`` for SQLAlchemy. SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; where only
    psycopg2 is installed (the usual wheel), name that driver instead of failing to import."""
    import importlib.util

    bare = url.startswith("postgresql://")
    if bare and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def database_failure(exc: BaseException) -> BaseException | None:
    """The database error behind ``exc`` (itself, or in its chain of causes), or None. An error raised
    ``from None`` over a database error (cass's TrackingError over MLflow's own SQLite store being locked)
    is not a failure of the study's database.

    When the database goes away mid-trial, Optuna raises ``StorageInternalError`` ("invalid data in the
    commit") and then, failing to read the trial back, an ``UnboundLocalError``: both are a lost database."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, DisconnectionError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    failure = None
    for current in exception_chain(exc):
        if isinstance(current, DBAPIError | DisconnectionError | PoolTimeout):
            return current  # the driver's own error: the most telling
        if isinstance(current, StorageInternalError) and failure is None:
            failure = current
    return failure


def database_reason(failure: BaseException) -> str:
    orig = getattr(failure, "orig", None)  # the driver's error inside SQLAlchemy's
    text = str(orig if orig is not None else failure).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact(" ".join(lines[:2]) or type(failure).__name__)


def _database_message(url: str, during: str, failure: BaseException) -> str:
    reason = database_reason(failure)
    return (
        f"the tuning database {redact(url)} failed during {during}: {reason}"
        f"{'' if reason.endswith(('.', '?', '!')) else '.'} Check that the database server runs and accepts "
        "connections from this machine (the URL comes from "
        f"--storage, ${STORAGE_ENV} or tune.storage), then rerun the same command: the study resumes with "
        "its finished trials, and trials that were running are failed and queued again"
    )


@contextlib.contextmanager
def study_database(url: str, during: str) -> Iterator[None]:
    """Turn a refused or lost database connection into one :class:`StudyDatabaseError` naming the storage."""
    try:
        yield
    except CassError:  # cass's own errors (a StudyDatabaseError, a TrackingError) say what failed already
        raise
    except Exception as exc:
        failure = database_failure(exc)
        if failure is None:
            raise
        raise StudyDatabaseError(_database_message(url, during, failure)) from None


@contextlib.contextmanager
def quiet_heartbeat_failures() -> Iterator[None]:
    """Optuna's heartbeat thread dies with a traceback when the database goes away; the trial's own
    thread meets the same failure and reports it once (as a StudyDatabaseError)."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and database_failure(args.exc_value) is not None:
            log.debug("heartbeat thread stopped: %s", database_reason(args.exc_value))
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
