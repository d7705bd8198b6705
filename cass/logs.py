"""Log levels the library sets for a block: a library's chatty INFO lines kept out of the user's console."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def at_least_warning(name: str) -> Iterator[None]:
    """Raise logger ``name`` to WARNING for the block (its own level is restored after), so that a line which
    says nothing to the user, or says it with a local path the caller words better, stays out of the log."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
