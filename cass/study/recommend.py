"""A study's recommendation: a settings fragment to merge into params.yaml, and a record per data version that
``pretrain.variant: auto`` follows (:func:`cass.variants.choose_recipe`).

The record lies at ``<study.recommendations>/<data hash>.json``, keyed by the content hash of the prepared
data (:func:`cass.run_keys.data_hash`: every file's sha256, label and split), so a recommendation applies to
exactly the data it was measured on; new data has none until a study runs on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cass.config import Params
from cass.io import atomic_write_text
from cass.outputs import MANIFEST_FILE
from cass.study.methods import NO_PRETRAINING, changes

FRAGMENT_FILE = "recommendation.yaml"


@dataclass(frozen=True)
class Recommendation:
    method: str
    settings: dict[str, Any]  # flat section.key -> value
    reason: str
    data_hash: str
    study: str  # the study's key
    parent_run_id: str | None = None

    @property
    def variant(self) -> str | None:
        """The CASS variant it recommends, or None (no pretraining, DINO)."""
        if self.settings.get("finetune.init") != "cass" or self.settings.get("pretrain.method") != "cass":
            return None
        return self.settings.get("pretrain.variant")


def record_file(params: Params, data_hash: str) -> Path:
    return Path(params.study.recommendations) / f"{data_hash[:16]}.json"


def recommendation(method: str, reason: str, data_hash: str, study: str, parent_run_id: str | None) -> Recommendation:
    return Recommendation(method, changes(method), reason, data_hash, study, parent_run_id)


def nested(settings: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        node = out
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out


def fragment(rec: Recommendation) -> str:
    """The settings fragment (YAML) that runs the recommended method, with where it came from."""
    head = [f"# Recommended by `cass study` {rec.study} on data {rec.data_hash[:12]}: {rec.method}.",
            f"# Why: {rec.reason}.",
            "# Merge into params.yaml; pretrain.variant: auto follows this recommendation for this data."]
    if rec.method == NO_PRETRAINING:
        head.append("# Pretraining did not pay here: fine-tune from the networks' start.")
    return "\n".join(head) + "\n" + yaml.safe_dump(nested(rec.settings), sort_keys=False)


def write(params: Params, rec: Recommendation, report_dir: Path) -> Path:
    """The fragment in the report folder, and the record ``pretrain.variant: auto`` reads; returns the fragment."""
    path = Path(report_dir) / FRAGMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, fragment(rec))
    record = record_file(params, rec.data_hash)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(asdict(rec), indent=2) + "\n")
    return path


def lookup(params: Params, data_dir: Path) -> Recommendation | None:
    """The recommendation recorded for the prepared data in ``data_dir``, if a study left one."""
    manifest = Path(data_dir) / MANIFEST_FILE
    if not manifest.is_file():
        return None
    # cass.run_keys.data_hash's value, computed here: cass.run_keys imports the pretraining, which asks this
    path = record_file(params, hashlib.sha256(manifest.read_bytes()).hexdigest())
    if not path.is_file():
        return None
    return Recommendation(**json.loads(path.read_text()))
