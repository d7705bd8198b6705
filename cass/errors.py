"""Errors that reach the user. Each message says what was wrong, where, and what to do."""

from __future__ import annotations


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
