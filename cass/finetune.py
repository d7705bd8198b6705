"""Stage ``finetune``: supervised fine-tuning of one network at a label fraction.

Starts from the CASS checkpoint (or random init, or given weights), trains with focal loss and class
weights on the label-fraction subset of the training split, validates on the whole validation split
after EVERY epoch, stops early on validation loss and keeps the best weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from cass import distributed
from cass.calibration import calibrate_classifier
from cass.config import Params
from cass.data.dataset import EpochLoader, ImageDataset, encode_targets, make_loader
from cass.data.manifest import atomic_write_text, label_lists, read_manifest
from cass.data.splits import read_subset
from cass.data.transforms import cass_transform, eval_transform
from cass.errors import DataError, TrainingError
from cass.lineage import git_commit
from cass.losses import FocalLoss, class_weights
from cass.metrics import classification_metrics
from cass.models import create_network, head_parameters, reset_head
from cass.pretrain import PretrainOutputs
from cass.training import (
    EpochCallback,
    autocast,
    check_finite,
    cosine_schedule,
    epoch_seed,
    load_weights_file,
    make_optimizer,
    resolve_device,
    resolve_num_workers,
    resolve_precision,
    save_weights,
    seed_everything,
    set_lr,
)

log = logging.getLogger(__name__)

Network = Literal["cnn", "vit"]
SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a fine-tuned classifier and preprocess its inputs."""

    network: str  # "cnn" or "vit"
    arch: str  # timm name
    image_size: int
    classes: tuple[str, ...]
    multilabel: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float = 0.5
    # Fitted on the validation split after fine-tuning (cass.calibration); absent from older model.json files.
    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None  # multi-label: one decision threshold per class

    def to_json(self) -> str:
        d = asdict(self)
        d.update(classes=list(self.classes), mean=list(self.mean), std=list(self.std))
        d["thresholds"] = None if self.thresholds is None else list(self.thresholds)
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> ClassifierSpec:
        if not path.is_file():
            raise TrainingError(f"{path}: model spec not found; run `cass finetune` first")
        d = json.loads(path.read_text())
        d.update(classes=tuple(d["classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]))
        if d.get("thresholds") is not None:
            d["thresholds"] = tuple(d["thresholds"])
        return cls(**d)

    def build(self) -> nn.Module:
        role: Network = "vit" if self.network == "vit" else "cnn"
        return create_network(self.arch, len(self.classes), role, self.image_size)


@dataclass(frozen=True)
class FinetuneOutputs:
    out_dir: Path

    @property
    def weights(self) -> Path:
        return self.out_dir / WEIGHTS_FILE

    @property
    def spec(self) -> Path:
        return self.out_dir / SPEC_FILE

    @property
    def history(self) -> Path:
        return self.out_dir / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics.json"


def load_classifier(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ClassifierSpec]:
    out = FinetuneOutputs(Path(model_dir))
    spec = ClassifierSpec.from_file(out.spec)
    model = spec.build()
    load_weights_file(model, out.weights)
    return model.to(device).eval(), spec


@torch.no_grad()
def predict_probs(
    model: nn.Module, loader: torch.utils.data.DataLoader, multilabel: bool, device: torch.device
) -> np.ndarray:
    model.eval()
    out = []
    for x, _ in loader:
        logits = model(x.to(device)).float()
        out.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)).cpu())
    return torch.cat(out).numpy()


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


def finetune(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None = None,
    *,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
) -> FinetuneOutputs:
    """Fine-tune ``network`` on the ``finetune.label_fraction`` subset; keep the best epoch's weights."""
    cfg = params.finetune
    out = FinetuneOutputs(Path(out_dir))
    df, info = read_manifest(Path(data_dir))
    subset = set(read_subset(Path(data_dir), cfg.label_fraction))
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

    ctx = distributed.setup(resolve_device(cfg.device))
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(params.seed)
    model = _initial_model(params, network, len(classes), pretrain_dir).to(device)
    channels_last = cfg.channels_last and device.type == "cuda" and network == "cnn"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    weights = class_weights(counts.tolist(), cfg.class_weights)
    criterion = FocalLoss(cfg.focal_gamma, cfg.focal_alpha, weights, info.multilabel).to(device)
    # Validation loss is reported unweighted-by-batching: the mean over all validation images.
    head = {id(p) for p in head_parameters(model)}
    optimizer = make_optimizer(
        cfg, [{"params": [p for p in model.parameters() if id(p) not in head]}, {"params": head_parameters(model)}]
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    # Several processes: DDP averages the gradients (frozen-backbone epochs leave parameters unused).
    model, ddp_model = distributed.wrap(
        model, device, sync_batchnorm=cfg.sync_batchnorm and network == "cnn", key="finetune.sync_batchnorm",
        find_unused_parameters=cfg.freeze_epochs > 0,
    )
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    image_size = params.model.image_size
    train_set = ImageDataset(
        Path(info.root),
        train["path"].tolist(),
        cass_transform(image_size, params.augment, cfg.augment_strength),
        y_train,
        params.data.max_image_pixels,
    )
    val_set = ImageDataset(
        Path(info.root),
        val["path"].tolist(),
        eval_transform(image_size, params.augment),
        y_val,
        params.data.max_image_pixels,
    )
    # batch_size is the global batch: each process loads its share (padded to equal shares) per epoch.
    local_batch = distributed.local_batch_size(cfg.batch_size, "finetune.batch_size")
    workers = resolve_num_workers(cfg.num_workers, device, distributed.local_world_size())
    sampler = distributed.sampler(train_set, shuffle=True, seed=params.seed, drop_last=False)
    shard = len(sampler)
    drop_last = shard > local_batch and shard % local_batch == 1  # a last batch of one breaks BatchNorm
    batches = shard // local_batch if drop_last else math.ceil(shard / local_batch)
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    schedule = cosine_schedule(cfg.lr, cfg.min_lr, steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs)
    val_loader = make_loader(val_set, params.evaluate.batch_size, shuffle=False, num_workers=workers, seed=0,
                             persistent_workers=True)

    spec = ClassifierSpec(
        network,
        params.model.cnn if network == "cnn" else params.model.vit,
        image_size,
        classes,
        info.multilabel,
        params.augment.mean,
        params.augment.std,
        params.evaluate.threshold,
    )
    log.info(
        "fine-tuning %s (%s) on %d labelled images (fraction %g), validating on %d",
        network,
        spec.arch,
        len(train_set),
        cfg.label_fraction,
        len(val_set),
    )
    history: list[dict] = []
    best_loss, best_epoch, best_state, stale = math.inf, 0, None, 0
    loaders = EpochLoader(train_set, sampler, local_batch, workers, drop_last)
    for epoch in range(cfg.epochs):
        frozen = epoch < cfg.freeze_epochs
        for p in model.parameters():
            p.requires_grad_(not frozen or id(p) in head)
        loader = loaders.for_epoch(epoch_seed(params.seed, epoch), epoch, ctx.rank)
        model.train()
        started, total, seen = time.perf_counter(), 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(
            loader,
            desc=f"finetune {network} {epoch + 1}/{cfg.epochs}",
            disable=None if progress and ctx.main else True,
            leave=False,
        )
        for i, (x, y) in enumerate(bar):
            group_size = min(cfg.accumulate, batches - (i // cfg.accumulate) * cfg.accumulate)
            set_lr(optimizer, float(schedule[min(epoch * steps_per_epoch + i // cfg.accumulate, len(schedule) - 1)]))
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_of_group = (i + 1) % cfg.accumulate == 0 or i + 1 == batches
            with distributed.no_sync((ddp_model,), enabled=not last_of_group):
                with autocast(device, precision):
                    logits = step_model(x)
                loss = criterion(logits, y)
                check_finite(loss, f"fine-tuning {network}, epoch {epoch + 1}, batch {i + 1}")
                scaler.scale(loss / group_size).backward()
            if last_of_group:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{loss.item():.4f}")

        totals = torch.tensor([total, seen], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(totals)
        total, seen = float(totals[0]), int(totals[1])
        # Rank 0 validates; every rank follows its loss, so early stopping cannot diverge.
        val_loss, val_metrics = math.nan, {"macro_f1": math.nan, "balanced_accuracy": math.nan}
        if ctx.main:
            val_loss, val_metrics = _validate(model, val_loader, criterion, spec, device, precision)
        val_loss = distributed.broadcast_float(val_loss, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "val_loss": val_loss,
            "val_macro_f1": val_metrics["macro_f1"],
            "val_balanced_accuracy": val_metrics["balanced_accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(record)
        log.info(
            "finetune %s epoch %d: train loss %.4f, val loss %.4f, val macro F1 %.3f",
            network,
            epoch + 1,
            record["train_loss"],
            val_loss,
            record["val_macro_f1"],
        )
        if val_loss < best_loss:
            best_loss, best_epoch, stale = val_loss, epoch + 1, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
        for cb in callbacks if ctx.main else ():
            cb(epoch + 1, record)
        if stale >= cfg.patience:
            log.info("early stop: validation loss has not improved for %d epochs", stale)
            break

    if best_state is None:
        raise TrainingError(f"fine-tuning {network} produced no finite validation loss")
    model.load_state_dict(best_state)
    best = history[best_epoch - 1]
    if not ctx.main:
        distributed.barrier()  # return once rank 0 has written the outputs
        return out
    out.out_dir.mkdir(parents=True, exist_ok=True)
    spec = calibrate_classifier(model, val_loader, spec, params.evaluate, device)  # temperature, thresholds
    save_weights(model, out.weights)
    atomic_write_text(out.spec, spec.to_json())
    atomic_write_text(out.history, pd.DataFrame(history).to_csv(index=False))
    summary = {
        "network": network,
        "arch": spec.arch,
        "init": cfg.init,
        "pretrain_method": _pretrain_method(cfg.init, pretrain_dir),
        "label_fraction": cfg.label_fraction,
        "labelled_images": len(train_set),
        "class_weights": cfg.class_weights,
        "class_weight_values": [round(float(w), 6) for w in weights],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "best_val_loss": best["val_loss"],
        "best_val_macro_f1": best["val_macro_f1"],
        "best_val_balanced_accuracy": best["val_balanced_accuracy"],
        "train_seconds": sum(h["epoch_seconds"] for h in history),
        "data_version": info.data_version,
        "git_commit": git_commit(),
    }
    atomic_write_text(out.metrics, json.dumps(summary, indent=2) + "\n")
    distributed.barrier()
    return out


@torch.no_grad()
def _validate(model: nn.Module, loader, criterion: FocalLoss, spec: ClassifierSpec, device: torch.device, precision):
    model.eval()
    total, n, probs, targets = 0.0, 0, [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        total += criterion(logits, y).item() * len(x)  # criterion is a mean over the batch
        n += len(x)
        probs.append((torch.sigmoid(logits) if spec.multilabel else torch.softmax(logits, -1)).cpu())
        targets.append(y.cpu())
    p, t = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    return total / n, classification_metrics(t, p, spec.classes, spec.multilabel, spec.threshold)
