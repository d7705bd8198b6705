"""What every self-supervised pretraining method shares: the pool, the fingerprint, the collapse
indicator's verdict, the outputs, and the run of a pretraining learner by the engine.

CASS (:mod:`cass.pretrain`) and the DINO baseline (:mod:`cass.baselines.dino`) both import this module
and nothing of each other, so both leave the same files: each network's weights, ``networks.json``,
``history.csv`` and ``metrics.json`` (``cass finetune`` loads either).
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from cass.config import NETWORKS, Params
from cass.data.dataset import ImageDataset
from cass.data.manifest import DatasetInfo, read_manifest
from cass.engine import Checkpoint, Engine, EpochStats, Learner, file_digest, fingerprint
from cass.errors import DataError
from cass.io import atomic_write_text
from cass.layout import MANIFEST_FILE, PretrainOutputs
from cass.lineage import git_commit
from cass.training import EpochCallback, save_weights

log = logging.getLogger(__name__)


def networks_spec(params: Params) -> dict:
    m = params.model
    return {"cnn": m.cnn, "vit": m.vit, "embed_dim": m.embed_dim, "image_size": m.image_size}


def pretrain_fingerprint(params: Params, data_dir: Path) -> str:
    """What a pretraining checkpoint depends on; a checkpoint with another fingerprint is not resumed
    (and :mod:`cass.retraining` reuses a finished pretraining only under the same fingerprint)."""
    keep = params.pretrain.model_dump(exclude={"num_workers", "device", "compile", "sync_batchnorm"})
    return fingerprint({
        "seed": params.seed,
        "model": params.model.model_dump(),
        "augment": params.augment.model_dump(),
        "pretrain": keep,
        "manifest": file_digest(Path(data_dir) / MANIFEST_FILE),
    })


def pretraining_pool(params: Params, data_dir: Path) -> tuple[pd.DataFrame, DatasetInfo]:
    """The unlabelled images self-supervised pretraining uses: every image of ``pretrain.pool``'s splits
    (never the test split, never only a label-fraction subset)."""
    df, info = read_manifest(Path(data_dir))
    pool = ("train",) if params.pretrain.pool == "train" else ("train", "val")
    rows = df[df["split"].isin(pool)]
    if len(rows) < 2:
        raise DataError(f"{data_dir}: only {len(rows)} image(s) in the pretraining pool {pool}")
    return rows, info


def collapsed_networks(record: Mapping[str, float], healthy: Mapping[str, float], fraction: float) -> list[str]:
    """The networks whose embedding spread in an epoch ``record`` (``<net>_embedding_std``) is under
    ``fraction`` x its healthy value (see :class:`cass.losses.EmbeddingSpread`)."""
    return [net for net, ok in healthy.items() if record[f"{net}_embedding_std"] < fraction * ok]


def warn_collapse(method: str, record: Mapping[str, float], healthy: Mapping[str, float], fraction: float) -> None:
    """Warn for each network whose embeddings collapsed in the epoch ``record``."""
    for net in collapsed_networks(record, healthy, fraction):
        log.warning(
            "possible collapse: %s %s embedding std %.4f < %.2f x healthy %.4f. From random init %s tends to "
            "collapse; start from pretrained weights (model.pretrained or *_weights).",
            method, net.upper(), record[f"{net}_embedding_std"], fraction, healthy[net], method,
        )


def write_outputs(
    out: PretrainOutputs,
    params: Params,
    info: DatasetInfo,
    networks: Mapping[str, torch.nn.Module],
    history: list[dict],
    details: dict,
    method: str = "cass",
) -> None:
    """Write what every pretraining method leaves behind (rank 0): each network's weights, networks.json,
    history.csv and metrics.json (loss and speed summaries, lineage, then the method's ``details``)."""
    for net, module in networks.items():
        save_weights(module, out.weights(net))
    atomic_write_text(out.networks, json.dumps({**networks_spec(params), "method": method}, indent=2) + "\n")
    atomic_write_text(out.history, pd.DataFrame(history).to_csv(index=False))
    summary = {
        "method": method,
        "final_loss": history[-1]["loss"],
        "best_loss": min(h["loss"] for h in history),
        "epochs": len(history),
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
        "train_seconds": sum(h["epoch_seconds"] for h in history),
        "data_version": info.data_version,
        "git_commit": git_commit(),
        **details,
    }
    atomic_write_text(out.metrics, json.dumps(summary, indent=2) + "\n")


class PretrainingLearner(Learner):
    """A self-supervised method over the pretraining pool; it trains both networks and reports, after
    every epoch, each network's embedding spread (the collapse indicator) and a warning when it collapsed.

    A subclass gives its ``method`` (``cass``, ``dino``), the ``transform`` that makes an image's views,
    its checkpoint file, its epoch ``record`` and log line, and the two networks it trained."""

    method: ClassVar[str]
    epoch_log: ClassVar[tuple[str, tuple[str, ...]]]
    """The epoch's log line: a format that starts with the epoch and the epochs, and the record keys after."""
    transform: Callable[[Any], Any]

    def __init__(self, params: Params, engine: Engine) -> None:
        self.params, self.engine = params, engine

    @staticmethod
    @abstractmethod
    def checkpoint_path(out: PretrainOutputs) -> Path: ...

    @abstractmethod
    def announce(self, images: int) -> None:
        """Log what is about to train."""

    @abstractmethod
    def record(self, stats: EpochStats) -> dict[str, float]:
        """The epoch's history row."""

    @staticmethod
    def healthy_of(record: Mapping[str, float]) -> dict[str, float]:
        """Each network's healthy embedding spread, as the ``record`` holds it: its own, or one for both."""
        return {net: record.get(f"{net}_healthy_embedding_std", record.get("healthy_embedding_std", 0.0))
                for net in NETWORKS}

    @abstractmethod
    def backbones(self) -> dict[str, torch.nn.Module]:
        """The networks whose weights the stage saves."""

    def details(self, last: Mapping[str, float]) -> dict[str, Any]:
        """metrics.json entries only this method has."""
        return {}

    def end_epoch(self, stats: EpochStats) -> dict[str, float]:
        record = self.record(stats)
        message, keys = self.epoch_log
        log.info(message, stats.epoch, stats.epochs, *(record[key] for key in keys))
        fraction = self.params.pretrain.collapse_warn_fraction
        warn_collapse(self.method.upper(), record, self.healthy_of(record), fraction)
        return record

    def summary(self, history: list[dict[str, float]], images: int) -> dict[str, Any]:
        """metrics.json beyond what every method writes: the last epoch's indicator and verdict, where."""
        last = history[-1]
        collapsed = collapsed_networks(last, self.healthy_of(last), self.params.pretrain.collapse_warn_fraction)
        return {
            "images": images,
            **{f"{net}_embedding_std": last[f"{net}_embedding_std"] for net in NETWORKS},
            **self.details(last),
            "collapsed": bool(collapsed),
            "precision": self.engine.precision.name,
            "device": str(self.engine.device),
            "processes": self.engine.ctx.world_size,
        }


def run_pretraining(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    learner_type: Callable[[Params, Engine], PretrainingLearner],
    *,
    resume: bool = True,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
) -> PretrainOutputs:
    """Pretrain with ``learner_type`` on the pool; resume its checkpoint when settings and data match."""
    out = PretrainOutputs(Path(out_dir))
    out.out_dir.mkdir(parents=True, exist_ok=True)
    rows, info = pretraining_pool(params, Path(data_dir))
    engine = Engine(params.pretrain, seed=params.seed, key="pretrain", callbacks=callbacks, progress=progress)
    learner = learner_type(params, engine)
    checkpoint = Checkpoint(learner.checkpoint_path(out), pretrain_fingerprint(params, Path(data_dir)), resume,
                            restart_hint="delete it or rerun with --no-resume")
    dataset = ImageDataset(Path(info.root), rows["path"].tolist(), learner.transform,
                           max_pixels=params.data.max_image_pixels)
    engine.data(dataset, full_batches=True)
    learner.announce(len(dataset))
    history = engine.fit(learner, checkpoint)
    engine.finish(lambda: write_outputs(out, params, info, learner.backbones(), history,
                                        learner.summary(history, len(dataset)), learner.method))
    return out
