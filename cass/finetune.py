"""Stage ``finetune``: supervised fine-tuning of one network at a label fraction.

Starts from the CASS checkpoint (or random init, or given weights), trains with focal loss and class
weights on the label-fraction subset of the training split, validates on the whole validation split
after EVERY epoch, stops early on validation loss and keeps the best weights. The engine
(:mod:`cass.engine`) runs the loop and checkpoints every epoch: an interrupted fine-tuning resumes
after its last finished epoch when its settings, data and initial weights are the same, and the
checkpoint is removed once the stage has written its outputs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cass import distributed
from cass.calibration import calibrate_classifier
from cass.classifier import ClassifierSpec
from cass.config import Network, Params
from cass.data.dataset import ImageDataset, encode_targets, make_loader
from cass.data.manifest import DatasetInfo, label_lists, read_manifest
from cass.data.splits import read_subset
from cass.data.transforms import cass_transform, eval_transform
from cass.engine import Checkpoint, Engine, EpochStats, Learner, Step, StepOutput, file_digest, fingerprint
from cass.errors import DataError, TrainingError
from cass.io import atomic_write_text, output_set
from cass.lineage import git_commit
from cass.losses import FocalLoss, class_weights
from cass.metrics import classification_metrics
from cass.models import create_network, head_parameters, reset_head
from cass.outputs import MANIFEST_FILE, FinetuneOutputs, PretrainOutputs, subset_file
from cass.training import EpochCallback, load_weights_file, make_optimizer, resolve_num_workers, save_weights

log = logging.getLogger(__name__)


def _initial_model(params: Params, network: Network, num_classes: int, pretrain_dir: Path | None) -> nn.Module:
    m, init = params.model, params.finetune.init
    arch = m.cnn if network == "cnn" else m.vit
    key = f"model.{network}"
    if init == "cass":
        if pretrain_dir is None:
            raise TrainingError("finetune.init is 'cass' but no pretraining output was given (--pretrain-dir)")
        pre = PretrainOutputs(Path(pretrain_dir))
        if not pre.networks.is_file():
            raise TrainingError(f"{pre.networks}: not found; run `cass pretrain` first or set finetune.init")
        spec = json.loads(pre.networks.read_text())
        if spec[network] != arch or spec["image_size"] != m.image_size:
            raise TrainingError(
                f"{pre.out_dir} holds a pretrained {spec[network]} at {spec['image_size']} px, but {key} is "
                f"{arch} at {m.image_size} px; rerun pretraining or restore the settings"
            )
        model = create_network(arch, spec["embed_dim"], network, m.image_size, key=key)
        load_weights_file(model, pre.weights(network))
        reset_head(model, num_classes)
        return model
    if init == "weights":
        weights = m.cnn_weights if network == "cnn" else m.vit_weights
        if not weights:
            raise TrainingError(f"finetune.init is 'weights' but model.{network}_weights is not set")
        return create_network(arch, num_classes, network, m.image_size, weights=weights, key=key)
    return create_network(arch, num_classes, network, m.image_size, pretrained=m.pretrained, key=key)


def _pretrain_method(init: str, pretrain_dir: Path | None) -> str:
    """``cass`` or ``dino`` (from networks.json) when starting from a pretraining output, else ``none``."""
    if init != "cass" or pretrain_dir is None:
        return "none"
    spec = PretrainOutputs(Path(pretrain_dir)).networks
    return str(json.loads(spec.read_text()).get("method", "cass")) if spec.is_file() else "cass"


@dataclass(frozen=True)
class LabelledData:
    """What fine-tuning reads: the label-fraction subset of the training split, the whole validation
    split, their encoded targets, and the subset's count of each class."""

    info: DatasetInfo
    train: pd.DataFrame
    val: pd.DataFrame
    y_train: np.ndarray
    y_val: np.ndarray
    counts: np.ndarray

    @classmethod
    def read(cls, params: Params, data_dir: Path) -> LabelledData:
        cfg = params.finetune
        df, info = read_manifest(data_dir)
        subset = set(read_subset(data_dir, cfg.label_fraction))
        train = df[(df["split"] == "train") & df["path"].isin(subset)]
        val = df[df["split"] == "val"]
        if val.empty:
            raise DataError(f"{data_dir}: the validation split is empty; early stopping needs one (split.val > 0)")
        classes = info.classes
        y_train = encode_targets(label_lists(train), classes, info.multilabel)
        y_val = encode_targets(label_lists(val), classes, info.multilabel)
        counts = y_train.sum(axis=0) if info.multilabel else np.bincount(y_train, minlength=len(classes))
        if cfg.class_weights == "inverse_frequency" and (counts == 0).any():
            missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
            raise DataError(f"label-fraction subset {cfg.label_fraction:g} has no example of {missing}")
        return cls(info, train, val, y_train, y_val, counts)


def _init_digest(params: Params, network: Network, pretrain_dir: Path | None) -> str:
    """The content of the weights fine-tuning starts from (a URI stands for an object store's file)."""
    m, init = params.model, params.finetune.init
    if init == "cass" and pretrain_dir is not None:
        pre = PretrainOutputs(Path(pretrain_dir))
        return fingerprint({"networks": file_digest(pre.networks), "weights": file_digest(pre.weights(network))})
    source = m.cnn_weights if network == "cnn" else m.vit_weights
    if init == "weights" and source and Path(source).is_file():
        return file_digest(Path(source))
    return f"{init}:{source}"


def finetune_fingerprint(params: Params, data_dir: Path, network: Network, pretrain_dir: Path | None) -> str:
    """What a fine-tuning checkpoint depends on: the settings that change its result, the data (manifest
    and label-fraction subset) and the initial weights; a checkpoint with another one is not resumed."""
    cfg = params.finetune
    return fingerprint({
        "seed": params.seed,
        "network": network,
        "max_image_pixels": params.data.max_image_pixels,
        "model": params.model.model_dump(),
        "augment": params.augment.model_dump(),
        "finetune": cfg.model_dump(exclude={"networks", "num_workers", "device", "compile", "sync_batchnorm"}),
        "evaluate": params.evaluate.model_dump(),
        "manifest": file_digest(Path(data_dir) / MANIFEST_FILE),
        "subset": file_digest(subset_file(Path(data_dir), cfg.label_fraction)),
        "init": _init_digest(params, network, pretrain_dir),
    })


class FinetuneLearner(Learner):
    """One network, focal loss with class weights, one optimiser (backbone and head groups). After every
    epoch rank 0 validates; every rank follows its loss, keeps the best weights and stops early alike."""

    def __init__(self, params: Params, engine: Engine, network: Network, data: LabelledData,
                 pretrain_dir: Path | None, origin: Mapping[str, Any] | None = None) -> None:
        cfg, info = params.finetune, data.info
        self.params, self.engine, self.network, self.data = params, engine, network, data
        self.pretrain_dir = Path(pretrain_dir) if pretrain_dir is not None and cfg.init == "cass" else None
        self.origin = dict(origin or {})
        self.name, self.peak_lr = f"fine-tuning {network}", cfg.lr
        model = _initial_model(params, network, len(info.classes), pretrain_dir)
        self.pretrain_method = _pretrain_method(cfg.init, pretrain_dir)
        self.weights = class_weights(data.counts.tolist(), cfg.class_weights)
        self.criterion = FocalLoss(cfg.focal_gamma, cfg.focal_alpha, self.weights, info.multilabel).to(engine.device)
        # Several processes: DDP averages the gradients (frozen-backbone epochs leave parameters unused).
        self.model, self._forward = engine.module(
            model, channels_last=model if network == "cnn" else None, sync_batchnorm=cfg.sync_batchnorm and
            network == "cnn", find_unused_parameters=cfg.freeze_epochs > 0,
        )
        self.head = {id(p) for p in head_parameters(self.model)}
        backbone = [p for p in self.model.parameters() if id(p) not in self.head]
        self.updater = engine.updater(
            make_optimizer(cfg, [{"params": backbone}, {"params": head_parameters(self.model)}])
        )
        self.spec = ClassifierSpec(
            network, params.model.cnn if network == "cnn" else params.model.vit, params.model.image_size,
            info.classes, info.multilabel, params.augment.mean, params.augment.std, params.evaluate.threshold,
            dicom=params.data.dicom.model_dump(mode="json") if params.data.layout == "dicom" else None,
        )
        self.train_set, self.val_loader = self._datasets()
        self.best_loss, self.best_epoch, self.best_state, self.stale = math.inf, 0, None, 0

    def _datasets(self) -> tuple[ImageDataset, torch.utils.data.DataLoader]:
        params, data, size = self.params, self.data, self.params.model.image_size
        root, pixels = Path(data.info.root), params.data.max_image_pixels
        train_transform = cass_transform(size, params.augment, params.finetune.augment_strength)
        train = ImageDataset(root, data.train["path"].tolist(), train_transform, data.y_train, pixels)
        val = ImageDataset(root, data.val["path"].tolist(), eval_transform(size, params.augment), data.y_val, pixels)
        workers = resolve_num_workers(params.finetune.num_workers, self.engine.device, distributed.local_world_size())
        return train, make_loader(val, params.evaluate.batch_size, shuffle=False, num_workers=workers, seed=0,
                                  persistent_workers=True)

    def start_epoch(self, epoch: int) -> None:
        frozen = epoch < self.params.finetune.freeze_epochs
        for p in self.model.parameters():
            p.requires_grad_(not frozen or id(p) in self.head)
        self.model.train()

    def step(self, batch: Any, step: Step) -> StepOutput:
        x, y = batch
        with self.engine.autocast():
            logits = self._forward(x)
        loss = self.criterion(logits, y)
        self.updater.backward(loss, step.divisor)
        return StepOutput({"loss": loss})

    def optimizer_step(self, step: Step) -> None:
        self.updater.step(step.lr)

    def end_epoch(self, stats: EpochStats) -> dict[str, float]:
        started = time.perf_counter()
        # Rank 0 validates; every rank follows its loss, so early stopping cannot diverge.
        val_loss, val_metrics = math.nan, {"macro_f1": math.nan, "balanced_accuracy": math.nan}
        if self.engine.main:
            val_loss, val_metrics = _validate(self.model, self.val_loader, self.criterion, self.spec, self.engine)
        val_loss = distributed.broadcast_float(val_loss, self.engine.device)
        record = {
            "epoch": stats.epoch,
            "train_loss": stats.losses["loss"],
            "val_loss": val_loss,
            "val_macro_f1": val_metrics["macro_f1"],
            "val_balanced_accuracy": val_metrics["balanced_accuracy"],
            "lr": stats.lr,
            "epoch_seconds": stats.seconds + time.perf_counter() - started,
        }
        log.info("finetune %s epoch %d/%d: train loss %.4f, val loss %.4f, val macro F1 %.3f", self.network,
                 stats.epoch, stats.epochs, record["train_loss"], val_loss, record["val_macro_f1"])
        self._keep_best(stats.epoch, val_loss)
        return record

    def _keep_best(self, epoch: int, val_loss: float) -> None:
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.stale = val_loss, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        else:
            self.stale += 1
        if self.should_stop():
            log.info("early stop: validation loss has not improved for %d epochs", self.stale)

    def should_stop(self) -> bool:
        return self.stale >= self.params.finetune.patience

    def state_dict(self) -> dict[str, Any]:
        best = {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state}
        return {"model": self.model.state_dict(), **self.updater.state_dict(), **best, "stale": self.stale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updater.load_state_dict(state)
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.best_state, self.stale = state["best_state"], int(state["stale"])

    def restore_best(self) -> None:
        """The weights of the epoch with the lowest validation loss (on every rank)."""
        if self.best_state is None:
            raise TrainingError(f"fine-tuning {self.network} produced no finite validation loss")
        self.model.load_state_dict(self.best_state)

    def lineage(self, out: FinetuneOutputs) -> dict[str, Any]:
        """lineage.json: what registration logs for this model, whatever params.yaml says by then."""
        cfg = self.params.finetune
        pretraining = None
        if self.pretrain_dir is not None:
            pre = PretrainOutputs(self.pretrain_dir)
            pretraining = {"method": self.pretrain_method, "dir": str(pre.out_dir),
                           "weights_sha256": file_digest(pre.weights(self.network)),
                           **{k: v for k, v in self.origin.items() if k == "run_id"}}
        return {
            "network": self.network,
            "arch": self.spec.arch,
            "weights_sha256": file_digest(out.weights),
            "git_commit": git_commit(),
            "data_version": self.data.info.data_version,
            "dataset": self.params.data.name,
            "label_fraction": cfg.label_fraction,
            "init": cfg.init,
            "class_weights": cfg.class_weights,
            "class_weight_values": [round(float(w), 6) for w in self.weights],
            "pretraining": pretraining,
            "tuning": self._tuning(),
            # Where models are tracked is not part of the model (registration uses the mlflow: settings of its time).
            "settings": self.params.model_dump(mode="json", exclude={"mlflow"}),
        }

    def _tuning(self) -> dict[str, Any] | None:
        """The tuning the settings came from, and which tuned values are in effect (an explicit setting may pin one)."""
        tuning = self.origin.get("tuning")
        if not tuning:
            return None
        effective = self.params.finetune.model_dump(mode="json")
        tuned = dict(tuning.get("finetune") or {})
        return {**tuning, "in_effect": sorted(k for k, v in tuned.items() if effective.get(k) == v)}

    def write_outputs(self, out: FinetuneOutputs, history: list[dict[str, float]]) -> None:
        """Weights, the spec that rebuilds the classifier, history.csv, lineage.json and metrics.json (rank 0),
        published as one set (:func:`cass.io.output_set`): the swap also drops the checkpoint, so the finished
        run is not resumed."""
        # Temperature (and multi-label thresholds) fitted on the validation split: cass.calibration.
        self.spec = calibrate_classifier(self.model, self.val_loader, self.spec, self.params.evaluate,
                                         self.engine.device)
        with output_set(out.out_dir) as staging:
            self._write(FinetuneOutputs(staging), history)

    def _write(self, out: FinetuneOutputs, history: list[dict[str, float]]) -> None:
        cfg, best = self.params.finetune, history[self.best_epoch - 1]
        save_weights(self.model, out.weights)
        atomic_write_text(out.spec, self.spec.to_json())
        atomic_write_text(out.history, pd.DataFrame(history).to_csv(index=False))
        summary = {  # numbers only: a DVC metrics file; where the model came from is in lineage.json
            "label_fraction": cfg.label_fraction,
            "labelled_images": len(self.train_set),
            "best_epoch": self.best_epoch,
            "epochs_run": len(history),
            "best_val_loss": best["val_loss"],
            "best_val_macro_f1": best["val_macro_f1"],
            "best_val_balanced_accuracy": best["val_balanced_accuracy"],
            "train_seconds": sum(h["epoch_seconds"] for h in history),
        }
        atomic_write_text(out.lineage, json.dumps(self.lineage(out), indent=2) + "\n")
        atomic_write_text(out.metrics, json.dumps(summary, indent=2) + "\n")


def finetune(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None = None,
    *,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
    resume: bool = True,
    tuning: Mapping[str, Any] | None = None,
    pretraining_run_id: str | None = None,
) -> FinetuneOutputs:
    """Fine-tune ``network`` on the ``finetune.label_fraction`` subset; keep the best epoch's weights.

    An unfinished fine-tuning in ``out_dir`` resumes after its last epoch (``resume=False`` starts over).
    ``tuning`` (the best-settings file ``params`` took tuned values from, as :func:`cass.tuning.tuning_origin`
    reads it) and ``pretraining_run_id`` (the MLflow run of the pretraining, when tracked) go into
    ``lineage.json`` beside the weights."""
    origin = {"tuning": dict(tuning) if tuning else None, "run_id": pretraining_run_id}
    out = FinetuneOutputs(Path(out_dir))
    data = LabelledData.read(params, Path(data_dir))
    engine = Engine(params.finetune, seed=params.seed, key="finetune", callbacks=callbacks, progress=progress)
    learner = FinetuneLearner(params, engine, network, data, pretrain_dir,
                              {k: v for k, v in origin.items() if v is not None})
    engine.data(learner.train_set, full_batches=False)
    log.info("fine-tuning %s (%s) on %d labelled images (fraction %g), validating on %d", network,
             learner.spec.arch, len(learner.train_set), params.finetune.label_fraction, len(data.val))
    checkpoint = Checkpoint(out.checkpoint, finetune_fingerprint(params, Path(data_dir), network, pretrain_dir),
                            resume, keep=False)
    history = engine.fit(learner, checkpoint)
    learner.restore_best()
    engine.finish(lambda: learner.write_outputs(out, history), checkpoint)
    return out


@torch.no_grad()
def _validate(model: nn.Module, loader: torch.utils.data.DataLoader, criterion: FocalLoss, spec: ClassifierSpec,
              engine: Engine) -> tuple[float, dict[str, Any]]:
    model.eval()
    total, n, probs, targets = 0.0, 0, [], []
    for x, y in loader:
        x, y = x.to(engine.device), y.to(engine.device)
        with engine.autocast():
            logits = model(x)
        logits = logits.float()
        total += criterion(logits, y).item() * len(x)  # criterion is a mean over the batch
        n += len(x)
        probs.append((torch.sigmoid(logits) if spec.multilabel else torch.softmax(logits, -1)).cpu())
        targets.append(y.cpu())
    p, t = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    return total / n, classification_metrics(t, p, spec.classes, spec.multilabel, spec.threshold)
