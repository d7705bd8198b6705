"""What prepared data was made from, and the check every later stage makes before reading it.

A failed ``cass data prepare`` leaves the previous outputs in place, on purpose; so a gate or a training
stage run next with other settings (``--set data.root=...``) would find a manifest of *another* dataset and
pass or train on it. ``prepare`` therefore records in ``dataset.json`` the settings that decide its outputs
(data root, layout and its settings, class list, group column, split settings and the split rule of
:mod:`cass.data.splits`) with the data version (the DVC md5) and their hash; :func:`ensure_prepared`
recomputes them from the settings a stage was given and refuses on any difference, naming it and the
command to run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass.errors import DataError
from cass.lineage import data_version
from cass.outputs import INFO_FILE

if TYPE_CHECKING:
    from cass.config import Params

# The settings whose change changes the prepared outputs. (data.name, data.workers, data.max_image_pixels
# and the demo sizes do not.)
PREPARE_SETTINGS = (
    "data.root",
    "data.layout",
    "data.csv",
    "data.medmnist_file",
    "data.group_column",
    "data.classes",
    "split.val",
    "split.test",
    "split.seed",
    "split.label_fractions",
)
DATA_VERSION = "data version"
SPLIT_RULE_KEY = "split rule"
SPLIT_RULE = "hash-bands-1"
"""Names the split rule of :mod:`cass.data.splits`; recorded with the split settings, so prepared data made by
another rule is redone. It lives here, below the splits module, because the fingerprint check reads it without
loading pandas."""


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return list(value) if isinstance(value, tuple) else value


def prepared_settings(params: Params, project_dir: Path | None = None) -> dict[str, Any]:
    """The settings (and data version) that prepared outputs made from ``params`` would record."""
    values: dict[str, Any] = {}
    for key in PREPARE_SETTINGS:
        section, name = key.split(".")
        values[key] = _plain(getattr(getattr(params, section), name))
    values["data.root"] = os.path.normpath(params.data.root)
    values[SPLIT_RULE_KEY] = SPLIT_RULE  # splits made by another rule are not these
    if params.data.layout == "dicom":  # the pixel settings decide the extracted images
        values["data.dicom"] = _plain(params.data.dicom)
    values[DATA_VERSION] = data_version(params.data.root, project_dir)
    return values


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def ensure_prepared(params: Params, data_dir: Path, project_dir: Path | None = None) -> None:
    """Refuse prepared data in ``data_dir`` that was not made from these settings and this data version.

    Every stage that reads the prepared data (the gates, pretraining, fine-tuning, tuning, evaluation) calls
    this first, with the settings it was given.
    """
    info_path = Path(data_dir) / INFO_FILE
    prepare = "`cass data prepare` (with the same --set options)"
    if not info_path.is_file():
        raise DataError(f"{info_path}: not found; run {prepare} first")
    try:
        recorded = json.loads(info_path.read_text())
    except ValueError as exc:
        raise DataError(f"{info_path}: not valid JSON ({exc}); run {prepare} again") from None
    if not isinstance(recorded, dict) or not recorded.get("fingerprint"):
        raise DataError(
            f"{info_path}: records no settings fingerprint (prepared by an older version of cass); run {prepare} "
            "again"
        )
    current = prepared_settings(params, project_dir)
    if recorded["fingerprint"] == fingerprint(current):
        return
    then = recorded.get("settings") or {}
    changed = [k for k in sorted(set(then) | set(current)) if then.get(k) != current.get(k)]
    lines = [f"  - {k}: prepared from {then.get(k)!r}, asked about {current.get(k)!r}" for k in changed]
    raise DataError(
        f"{data_dir} holds data prepared from other data or settings than those given:\n"
        + "\n".join(lines or ["  - (the recorded fingerprint does not match)"])
        + f"\nIts manifest describes that data, not this; run {prepare} first."
    )
