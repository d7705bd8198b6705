"""What a retraining run decides before it trains: did anything change, and can the pretraining be reused.

GPU hours are the main cost of retraining. The *run key* identifies the data (the manifest's content hash:
every image's sha256, label and split) and every setting that changes a result; the pipeline records it
as the tag ``run_key`` on its MLflow parent run, and ``outcome=completed`` once the models are registered
and the promotion decided. A scheduled run whose key matches such a finished run trains nothing.

Pretraining depends on fewer settings than fine-tuning (its own fingerprint in :mod:`cass.pretraining_common`):
when the checkpoint on disk has finished with the current fingerprint and an MLflow run recorded that
fingerprint, a run with, say, another fine-tuning learning rate reuses it instead of training again.

The decisions and the searches they need are here; :mod:`cass.tracking` runs the searches in MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cass.config import Params, params_to_flat_dict
from cass.outputs import MANIFEST_FILE

log = logging.getLogger(__name__)

RUN_KEY_TAG = "run_key"
OUTCOME_TAG = "outcome"
COMPLETED = "completed"
PRETRAIN_FINGERPRINT_TAG = "pretrain_fingerprint"

# Settings that say how or where to run, not what comes out of it.
_RUN_ONLY_SECTIONS = ("mlflow.", "retrain.", "study.")  # a study reads its settings, a run's result does not
_RUN_ONLY_KEYS = (
    "data.root",  # the content counts (manifest hash), not where it lies
    "data.workers",
    "tune.storage",
    "tune.study_name",
    "tune.heartbeat_interval",
    "tune.grace_period",
    "tune.max_retry",
)
_RUN_ONLY_NAMES = ("num_workers", "device", "compile")  # in any section


def result_settings(params: Params, *, tuning: bool) -> dict[str, Any]:
    """The flat settings that change a result; the ``tune`` section only counts when tuning runs."""

    def counts(key: str) -> bool:
        if key.startswith(_RUN_ONLY_SECTIONS) or key in _RUN_ONLY_KEYS:
            return False
        if key.rsplit(".", 1)[-1] in _RUN_ONLY_NAMES:
            return False
        return tuning or not key.startswith("tune.")

    return {k: v for k, v in params_to_flat_dict(params).items() if counts(k)}


def data_hash(data_dir: Path) -> str:
    """The content hash of a prepared dataset: its manifest lists every file's sha256, labels and split."""
    return hashlib.sha256((Path(data_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def run_key(params: Params, data_dir: Path, *, tuning: bool) -> str:
    """Equal for two runs on the same data with the same result-changing settings."""
    payload = {"data": data_hash(data_dir), "tuning": tuning, "settings": result_settings(params, tuning=tuning)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def completed_run_filter(key: str) -> str:
    """The MLflow search for a finished pipeline run with this run key whose models were registered."""
    return f"tags.{RUN_KEY_TAG} = '{key}' and tags.{OUTCOME_TAG} = '{COMPLETED}' and attributes.status = 'FINISHED'"


def pretraining_filter(fingerprint: str) -> str:
    """The MLflow search for a finished pretraining run that recorded this fingerprint."""
    return f"tags.{PRETRAIN_FINGERPRINT_TAG} = '{fingerprint}' and attributes.status = 'FINISHED'"


def pretrain_fingerprint(params: Params, data_dir: Path) -> str:
    """What the pretraining checkpoint depends on (the fingerprint :func:`cass.cass_pretraining.pretrain`
    resumes by)."""
    from cass.pretraining_common import pretrain_fingerprint as fingerprint

    return fingerprint(params, Path(data_dir))


def finished_checkpoint(params: Params, data_dir: Path, pretrain_dir: Path) -> bool:
    """True when ``pretrain_dir`` holds the weights of a pretraining that finished with the current settings."""
    from cass.outputs import PretrainOutputs
    from cass.training import load_checkpoint

    out = PretrainOutputs(Path(pretrain_dir))
    checkpoint = out.checkpoint
    if not all(p.is_file() for p in (checkpoint, out.cnn, out.vit, out.networks, out.metrics)):
        return False
    state = load_checkpoint(checkpoint)
    done = int(state.get("epoch", -1)) + 1
    return state.get("fingerprint") == pretrain_fingerprint(params, data_dir) and done >= params.pretrain.epochs
