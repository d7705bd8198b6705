"""Errors that reach the user. Each message says what was wrong, where, and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cass.quality.gate import GateResult


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` to a mistyped ``name``, or ``""``: every
    "unknown ..." message (settings keys, layouts, checks, metrics, tunable settings) suggests the same way."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors behind it, as a traceback shows them: its ``__cause__``, else its
    ``__context__`` unless it was raised ``from None`` (``__suppress_context__``): an error raised so has
    taken the place of the one it was handling, which is no longer its reason."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


class CassError(Exception):
    """Base class: the CLI prints the message and exits non-zero without a traceback."""

    exit_code = 1


class ConfigError(CassError):
    """A setting in params.yaml or an override is unknown or invalid."""

    exit_code = 2


class DataError(CassError):
    """The dataset cannot be used as it is (missing, corrupt or mislabelled files, bad CSV...)."""

    exit_code = 3


class TrainingError(CassError):
    """Training cannot go on (non-finite loss, missing checkpoint, ...)."""

    exit_code = 4


class GateFailed(CassError):
    """A data-quality or model gate found a failed check of severity "fail"; the stage must not run."""

    exit_code = 5

    def __init__(self, message: str, result: GateResult | None = None) -> None:
        super().__init__(message)
        self.result = result  # the cass.quality.GateResult, for callers that want the details


class RegistryError(CassError):
    """A registry operation cannot be done (unknown model or version, no previous champion, ...)."""

    exit_code = 7


class VersioningError(CassError):
    """DVC cannot version, push or pull the data: no DVC repository or remote, unreachable endpoint, corrupt cache."""

    exit_code = 8


class DiskFullError(CassError):
    """A write ran out of space: the message names the path and the space it needed; nothing half-written
    is left as the current output."""

    exit_code = 9


class ModelIntegrityError(CassError):
    """A model folder's code or weights differ from the content hashes recorded when it was exported."""

    exit_code = 10


class StudyDatabaseError(CassError):
    """The Optuna study database cannot be reached or written (server down, wrong URL, no permission)."""

    exit_code = 11
