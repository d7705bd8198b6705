"""What every handler starts from: the settings, read and validated once, and where the outputs go.

``--params`` and ``--set`` give the raw mapping. A flag that sets a setting (``pretrain --method``,
``tune --n-trials``, ...) becomes a typed update of that mapping, applied after the ``--set`` overrides
and before the one validation: a bad flag value is rejected exactly like a bad ``--set``, by a message
naming the key, and nothing is written back to text to be parsed again.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass.errors import ConfigError

if TYPE_CHECKING:
    from cass.config import Network, Params
    from cass.outputs import Layout


def apply_updates(raw: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with each ``section.key`` of ``updates`` set to its value; ``raw`` itself is left as it is
    (the sections on the way to a key are copied, the others shared)."""
    data = dict(raw)
    for key, value in updates.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            child = node.get(section)
            if child is not None and not isinstance(child, Mapping):
                raise ConfigError(f"{key}: '{section}' is a value, not a section")
            node[section] = child = dict(child or {})
            node = child
        node[name] = value
    return data


def load_settings(
    path: str | Path, overrides: Iterable[str] = (), updates: Mapping[str, Any] | None = None
) -> Params:
    """The settings file, then the ``--set`` overrides, then ``updates`` ({"pretrain.method": "dino"}),
    validated once by the schema of ``params.yaml``; a searched finetune key that ``--set`` gives is
    pinned (:func:`cass.config.pin_overridden`)."""
    from cass.config import apply_overrides, params_from_mapping, pin_overridden, read_params_file

    overrides, updates = list(overrides), dict(updates or {})
    raw = apply_updates(apply_overrides(read_params_file(path), overrides), updates)
    source = f"{path}" + (f" with overrides {overrides}" if overrides else "")
    if updates:
        source += f"{' and' if overrides else ' with'} options {updates}"
    return pin_overridden(params_from_mapping(raw, source), overrides)


def settings(args: argparse.Namespace, updates: Mapping[str, Any] | None = None) -> Params:
    """The command's settings; an update whose flag was not given (None) changes nothing."""
    given = {key: value for key, value in (updates or {}).items() if value is not None}
    return load_settings(args.params, args.overrides, given)


def outputs(args: argparse.Namespace) -> Layout:
    """Where the stages read and write (``--outputs``)."""
    from cass.outputs import Layout

    return Layout(Path(args.outputs))


def networks(args: argparse.Namespace, params: Params) -> tuple[Network, ...]:
    """``--network``: one network, or ``both`` = the networks of finetune.networks."""
    return tuple(params.finetune.networks) if args.network == "both" else (args.network,)


def reporting_rank() -> bool:
    """True in a single process and in rank 0 of torchrun: the process that prints the results."""
    return os.environ.get("RANK", "0") == "0"
