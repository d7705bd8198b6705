"""What every self-supervised pretraining method shares: the pool, the fingerprint, the collapse
indicator's verdict, the outputs, and the run of a pretraining learner by the engine.

CASS (:mod:`cass.cass_pretraining`) and the DINO baseline (:mod:`cass.baselines.dino`) both import this module
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
from cass.io import atomic_write_text, output_set
from cass.lineage import git_commit
from cass.monitor import KnnMonitor
from cass.outputs import MANIFEST_FILE, PretrainOutputs
from cass.training import EpochCallback, save_weights

log = logging.getLogger(__name__)

LABELS = {"cnn": "CNN", "vit": "ViT"}


def networks_spec(params: Params) -> dict:
    m = params.model
    return {"cnn": m.cnn, "vit": m.vit, "embed_dim": m.embed_dim, "image_size": m.image_size}


def pretrain_fingerprint(params: Params, data_dir: Path) -> str:
    """What a pretraining checkpoint depends on; a checkpoint with another fingerprint is not resumed
    (and :mod:`cass.run_keys` reuses a finished pretraining only under the same fingerprint)."""
    if params.pretrain.method == "cass":  # pretrain.variant: auto as it resolves on this data (a study's choice)
        from cass.variants import choose_recipe

        params = choose_recipe(params, Path(data_dir))[0]
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


def collapse_message(method: str, record: Mapping[str, float], healthy: Mapping[str, float], fraction: float,
                     hint: str) -> str | None:
    """The one warning of a run whose embeddings collapsed in the epoch ``record`` (None when none did):
    which networks, by how much, and what to do (``hint``, the method's advice)."""
    nets = collapsed_networks(record, healthy, fraction)
    if not nets:
        return None
    spreads = ", ".join(f"{LABELS[net]} embedding std {record[f'{net}_embedding_std']:.4f} "
                        f"< {fraction:.2f} x healthy {healthy[net]:.4f}" for net in nets)
    return (f"possible collapse: {method} {spreads} (epoch {int(record['epoch'])}). {hint} "
            "Reported once; the end of pretraining says whether it lasted.")


def write_outputs(
    out: PretrainOutputs,
    params: Params,
    info: DatasetInfo,
    networks: Mapping[str, torch.nn.Module],
    history: list[dict],
    details: dict,
    method: str = "cass",
    recipe: Mapping[str, Any] | None = None,
) -> None:
    """Write what every pretraining method leaves behind (rank 0): each network's weights, networks.json
    (the networks, the method and its ``recipe``), history.csv and metrics.json (loss and speed summaries,
    lineage, the ``recipe``, then the method's ``details``), published as one set; the checkpoints in the
    folder stay (they tell a later run that this pretraining finished, :mod:`cass.run_keys`)."""
    with output_set(out.out_dir, carry=(out.CHECKPOINT, out.DINO_CHECKPOINT)) as staging:
        _write_outputs(PretrainOutputs(staging), params, info, networks, history, details, method, recipe)


def _write_outputs(out: PretrainOutputs, params: Params, info: DatasetInfo, networks: Mapping[str, torch.nn.Module],
                   history: list[dict], details: dict, method: str, recipe: Mapping[str, Any] | None) -> None:
    recipe = dict(recipe or {})
    for net, module in networks.items():
        save_weights(module, out.weights(net))
    spec = {**networks_spec(params), "method": method, **recipe}
    atomic_write_text(out.networks, json.dumps(spec, indent=2) + "\n")
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
        **recipe,
        **details,
    }
    atomic_write_text(out.metrics, json.dumps(summary, indent=2) + "\n")


class PretrainingLearner(Learner):
    """A self-supervised method over the pretraining pool; it trains both networks and reports, after
    every epoch, each network's embedding spread (the collapse indicator), warns once when it first
    collapses and says at the end whether it lasted; with a :class:`~cass.monitor.KnnMonitor`
    (``pretrain.monitor_every``) it also measures, on rank 0, the kNN accuracy of each network's features
    before the first epoch, every ``monitor_every`` epochs and after the last.

    A subclass gives its ``method`` (``cass``, ``dino``), the ``transform`` that makes an image's views,
    its checkpoint file, its epoch ``record`` and log line, what to do about a collapse
    (``collapse_hint``), the two networks it trained, and its ``state_dict`` (with :meth:`monitor_state`)."""

    method: ClassVar[str]
    epoch_log: ClassVar[tuple[str, tuple[str, ...]]]
    """The epoch's log line: a format that starts with the epoch and the epochs, and the record keys after."""
    transform: Callable[[Any], Any]

    def __init__(self, params: Params, engine: Engine) -> None:
        self.params, self.engine = params, engine
        self.monitor: KnnMonitor | None = None
        self.knn_start: dict[str, float] = {}
        self.collapse_reported = False

    @staticmethod
    @abstractmethod
    def checkpoint_path(out: PretrainOutputs) -> Path: ...

    @abstractmethod
    def announce(self, images: int) -> None:
        """Log what is about to train."""

    @abstractmethod
    def record(self, stats: EpochStats) -> dict[str, float]:
        """The epoch's history row."""

    @property
    def collapse_hint(self) -> str:
        """What to do when the embeddings collapse (one sentence or two)."""
        return "Start from pretrained weights (model.pretrained or *_weights)."

    def recipe(self) -> dict[str, Any]:
        """What the method ran beyond the networks (networks.json and metrics.json): its variant, views..."""
        return {}

    @staticmethod
    def healthy_of(record: Mapping[str, float]) -> dict[str, float]:
        """Each network's healthy embedding spread, as the ``record`` holds it: its own, or one for both."""
        return {net: record.get(f"{net}_healthy_embedding_std", record.get("healthy_embedding_std", 0.0))
                for net in NETWORKS}

    @abstractmethod
    def backbones(self) -> dict[str, torch.nn.Module]:
        """The networks whose weights the stage saves (plain modules, never DDP wrappers)."""

    def details(self, last: Mapping[str, float]) -> dict[str, Any]:
        """metrics.json entries only this method has."""
        return {}

    # -- the representation monitor ---------------------------------------------------------------

    def watch(self, monitor: KnnMonitor | None) -> None:
        """Measure the kNN accuracy of the backbones with ``monitor`` (rank 0 only; None: not at all)."""
        self.monitor = monitor if self.engine.main else None

    def _knn(self, monitor: KnnMonitor) -> dict[str, float]:
        values = monitor(self.backbones(), self.engine.device)
        log.info("%s kNN accuracy of the features: CNN %.3f / ViT %.3f", self.method.upper(),
                 values["cnn_knn_accuracy"], values["vit_knn_accuracy"])
        return values

    def begin(self, start_epoch: int) -> dict[str, float] | None:
        """Before a fresh run's first epoch: the kNN curve's start (a resumed run has it in its checkpoint)."""
        if self.monitor is None or start_epoch > 0:
            return None
        self.knn_start = self._knn(self.monitor)
        return self.knn_start

    def monitor_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the monitor (the curve's start), beside the method's state."""
        return {"knn_start": dict(self.knn_start)}

    def load_monitor_state(self, state: Mapping[str, Any]) -> None:
        self.knn_start = dict(state.get("knn_start", {}))

    def end_epoch(self, stats: EpochStats) -> dict[str, float]:
        record = self.record(stats)
        message, keys = self.epoch_log
        log.info(message, stats.epoch, stats.epochs, *(record[key] for key in keys))
        every = self.params.pretrain.monitor_every
        if self.monitor is not None and every > 0 and (stats.epoch % every == 0 or stats.epoch == stats.epochs):
            record.update(self._knn(self.monitor))
        if not self.collapse_reported:
            fraction = self.params.pretrain.collapse_warn_fraction
            message = collapse_message(self.method.upper(), record, self.healthy_of(record), fraction,
                                       self.collapse_hint)
            if message is not None:
                log.warning("%s", message)
                self.collapse_reported = True
        return record

    def summary(self, history: list[dict[str, float]], images: int) -> dict[str, Any]:
        """metrics.json beyond what every method writes: the last epoch's indicator and verdict, the kNN
        curve's start and end, where. Logs the run's one collapse summary."""
        last = history[-1]
        fraction = self.params.pretrain.collapse_warn_fraction
        healthy = self.healthy_of(last)
        collapsed = collapsed_networks(last, healthy, fraction)
        tripped = [int(h["epoch"]) for h in history if collapsed_networks(h, self.healthy_of(h), fraction)]
        spreads = ", ".join(f"{LABELS[net]} {last[f'{net}_embedding_std']:.4f}" for net in NETWORKS)
        if collapsed:
            # The advice once per run: the warning of the epoch that tripped gave it, when this process saw it.
            advice = (f"What to do: see the warning of epoch {tripped[0]}." if self.collapse_reported and tripped
                      else self.collapse_hint)
            log.warning("collapse check: %s pretraining ended collapsed (%s embedding std %s; healthy %.4f, "
                        "warning under %.2f x). %s", self.method.upper(), "/".join(LABELS[n] for n in collapsed),
                        spreads, healthy[collapsed[0]], fraction, advice)
        elif tripped:
            log.info("collapse check: %s embeddings collapsed in epoch(s) %s but ended spread (%s)",
                     self.method.upper(), ", ".join(map(str, tripped)), spreads)
        else:
            log.info("collapse check: %s embeddings stayed spread (std %s)", self.method.upper(), spreads)
        measured = [h for h in history if all(f"{net}_knn_accuracy" in h for net in NETWORKS)]
        knn = {}
        if self.knn_start:
            knn.update({f"{key}_start": value for key, value in self.knn_start.items()})
        if measured:
            knn.update({f"{net}_knn_accuracy": measured[-1][f"{net}_knn_accuracy"] for net in NETWORKS})
        return {
            "images": images,
            **{f"{net}_embedding_std": last[f"{net}_embedding_std"] for net in NETWORKS},
            **self.details(last),
            "collapsed": bool(collapsed),
            **knn,
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
    if params.pretrain.monitor_every > 0:
        learner.watch(KnnMonitor.from_params(params, Path(data_dir)))
    checkpoint = Checkpoint(learner.checkpoint_path(out), pretrain_fingerprint(params, Path(data_dir)), resume,
                            restart_hint="delete it or rerun with --no-resume")
    dataset = ImageDataset(Path(info.root), rows["path"].tolist(), learner.transform,
                           max_pixels=params.data.max_image_pixels)
    engine.data(dataset, full_batches=True)
    learner.announce(len(dataset))
    history = engine.fit(learner, checkpoint)
    engine.finish(lambda: write_outputs(out, params, info, learner.backbones(), history,
                                        learner.summary(history, len(dataset)), learner.method, learner.recipe()))
    return out
