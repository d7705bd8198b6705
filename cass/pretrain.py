"""Stage ``pretrain``: CASS self-supervised pretraining of a CNN and a ViT together.

Every batch is ONE augmented view; it goes through both networks, and the loss ``2 - 2 cos`` between
their embeddings trains both. Labels are not used, and every unlabelled training image is used (not
only the label-fraction subset). Gradients are zeroed after every optimiser step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from cass import distributed
from cass.config import Params
from cass.data.dataset import EpochLoader, ImageDataset
from cass.data.manifest import DatasetInfo, read_manifest
from cass.data.transforms import cass_transform
from cass.errors import DataError
from cass.io import atomic_write_text
from cass.layout import MANIFEST_FILE, PretrainOutputs
from cass.lineage import git_commit
from cass.losses import AntiCollapseCASSLoss, CASSLoss, EmbeddingSpread
from cass.models import create_network
from cass.training import (
    EpochCallback,
    Precision,
    autocast,
    check_finite,
    cosine_schedule,
    epoch_seed,
    load_checkpoint,
    make_optimizer,
    resolve_device,
    resolve_num_workers,
    resolve_precision,
    save_checkpoint,
    save_weights,
    seed_everything,
    set_lr,
    unwrap,
)

log = logging.getLogger(__name__)

def networks_spec(params: Params) -> dict:
    m = params.model
    return {"cnn": m.cnn, "vit": m.vit, "embed_dim": m.embed_dim, "image_size": m.image_size}


def _fingerprint(params: Params, data_dir: Path) -> str:
    """What the checkpoint depends on; a checkpoint with another fingerprint is not resumed."""
    keep = params.pretrain.model_dump(exclude={"num_workers", "device", "compile", "sync_batchnorm"})
    payload = json.dumps(
        {
            "seed": params.seed,
            "model": params.model.model_dump(),
            "augment": params.augment.model_dump(),
            "pretrain": keep,
            "manifest": hashlib.sha256((data_dir / MANIFEST_FILE).read_bytes()).hexdigest(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def write_outputs(
    out: PretrainOutputs,
    params: Params,
    info: DatasetInfo,
    networks: dict[str, torch.nn.Module],
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


def pretraining_pool(params: Params, data_dir: Path) -> tuple[pd.DataFrame, DatasetInfo]:
    """The unlabelled images self-supervised pretraining uses: every image of ``pretrain.pool``'s splits
    (never the test split, never only a label-fraction subset)."""
    df, info = read_manifest(Path(data_dir))
    pool = ("train",) if params.pretrain.pool == "train" else ("train", "val")
    rows = df[df["split"].isin(pool)]
    if len(rows) < 2:
        raise DataError(f"{data_dir}: only {len(rows)} image(s) in the pretraining pool {pool}")
    return rows, info


def cass_step(
    cnn: torch.nn.Module,
    vit: torch.nn.Module,
    x: torch.Tensor,
    criterion: CASSLoss,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: Precision,
    channels_last: bool = False,
    loss_divisor: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One view through both networks, the CASS loss, and gradients into both (no optimiser step).

    Returns the (undivided) loss and both embeddings. A non-finite loss is not backpropagated.
    """
    x_cnn = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with autocast(device, precision):
        z_cnn = cnn(x_cnn)
        z_vit = vit(x)
    loss = criterion(z_cnn, z_vit)
    if torch.isfinite(loss):
        scaler.scale(loss / loss_divisor).backward()
    return loss, z_cnn, z_vit


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Step both networks' parameters, then zero the gradients (the public notebook never did)."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def pretrain(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    *,
    resume: bool = True,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
) -> PretrainOutputs:
    """Train both networks with the CASS objective; returns where the weights and metrics are.

    ``pretrain.method: dino`` runs the DINO baseline instead (same outputs; see cass.baselines.dino)."""
    if params.pretrain.method == "dino":
        from cass.baselines.dino import pretrain_dino

        return pretrain_dino(params, data_dir, out_dir, resume=resume, callbacks=callbacks, progress=progress)
    cfg = params.pretrain
    out = PretrainOutputs(Path(out_dir))
    out.out_dir.mkdir(parents=True, exist_ok=True)
    rows, info = pretraining_pool(params, Path(data_dir))
    fingerprint = _fingerprint(params, Path(data_dir))

    ctx = distributed.setup(resolve_device(cfg.device))
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(params.seed)
    m = params.model
    cnn = create_network(m.cnn, m.embed_dim, "cnn", m.image_size, m.pretrained, m.cnn_weights, key="model.cnn")
    vit = create_network(m.vit, m.embed_dim, "vit", m.image_size, m.pretrained, m.vit_weights, key="model.vit")
    cnn.to(device)
    vit.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        cnn.to(memory_format=torch.channels_last)
    # Several processes: DDP averages the gradients; cnn/vit stay the plain modules (saved, resumed).
    cnn, cnn_ddp = distributed.wrap(cnn, device, sync_batchnorm=cfg.sync_batchnorm, key="pretrain.sync_batchnorm")
    vit, vit_ddp = distributed.wrap(vit, device)
    optimizer = make_optimizer(cfg, [{"params": list(cnn.parameters())}, {"params": list(vit.parameters())}])
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    cnn_step = torch.compile(cnn_ddp) if cfg.compile else cnn_ddp
    vit_step = torch.compile(vit_ddp) if cfg.compile else vit_ddp
    criterion = CASSLoss() if cfg.anti_collapse == "none" else AntiCollapseCASSLoss(cfg.anti_collapse_weight)

    dataset = ImageDataset(
        Path(info.root),
        rows["path"].tolist(),
        cass_transform(m.image_size, params.augment),
        max_pixels=params.data.max_image_pixels,
    )
    drop_last = len(dataset) > cfg.batch_size  # a last batch of one breaks BatchNorm
    # batch_size is the global batch: each process loads its share of one permutation per epoch.
    local_batch = distributed.local_batch_size(cfg.batch_size, "pretrain.batch_size")
    workers = resolve_num_workers(cfg.num_workers, device, distributed.local_world_size())
    sampler = distributed.sampler(dataset, shuffle=True, seed=params.seed, drop_last=drop_last)
    batches = len(sampler) // local_batch if drop_last else math.ceil(len(sampler) / local_batch)
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    schedule = cosine_schedule(cfg.lr, cfg.min_lr, steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs)

    start_epoch, history = 0, []
    ckpt_path = out.checkpoint
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("fingerprint") == fingerprint:
            cnn.load_state_dict(state["cnn"])
            vit.load_state_dict(state["vit"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
            log.info("resuming CASS pretraining from %s after epoch %d", ckpt_path, start_epoch)
        else:
            log.warning("%s was made with other settings or data; starting from scratch", ckpt_path)

    healthy = 1.0 / math.sqrt(m.embed_dim)  # both networks embed into m.embed_dim
    healthy_of = {"cnn": healthy, "vit": healthy}
    log.info(
        "CASS pretraining: %s + %s, %d images, batch %d x %d, %s on %s",
        m.cnn,
        m.vit,
        len(dataset),
        cfg.batch_size,
        cfg.accumulate,
        precision.name,
        device,
    )
    loaders = EpochLoader(dataset, sampler, local_batch, workers, drop_last, pin_memory=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        loader = loaders.for_epoch(epoch_seed(params.seed, epoch), epoch, ctx.rank)
        cnn.train()
        vit.train()
        sums = {"loss": 0.0, "n": 0}
        spread = {net: EmbeddingSpread(m.embed_dim, device) for net in ("cnn", "vit")}
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"pretrain {epoch + 1}/{cfg.epochs}",
            disable=None if progress and ctx.main else True,
            leave=False,
            unit="batch",
        )
        optimizer.zero_grad(set_to_none=True)
        for i, (x, _) in enumerate(bar):
            group_start = (i // cfg.accumulate) * cfg.accumulate
            group_size = min(cfg.accumulate, batches - group_start)
            step = epoch * steps_per_epoch + i // cfg.accumulate
            set_lr(optimizer, float(schedule[min(step, len(schedule) - 1)]))
            x = x.to(device, non_blocking=True)
            last_of_group = (i + 1) % cfg.accumulate == 0 or i + 1 == batches
            with distributed.no_sync((cnn_ddp, vit_ddp), enabled=not last_of_group):
                loss, z_cnn, z_vit = cass_step(
                    cnn_step, vit_step, x, criterion, scaler, device=device, precision=precision,
                    channels_last=channels_last, loss_divisor=group_size,
                )
            check_finite(loss, f"pretraining epoch {epoch + 1}, batch {i + 1}")
            if last_of_group:
                optimizer_step(optimizer, scaler)
            spread["cnn"].add(z_cnn)
            spread["vit"].add(z_vit)
            sums["loss"] += loss.item() * len(x)
            sums["n"] += len(x)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{sums['n'] / (time.perf_counter() - started):.0f}")
        seconds = time.perf_counter() - started
        # Metrics over the global epoch: sum the per-process sums (the loss itself stayed local).
        totals = torch.tensor([sums["loss"], sums["n"]], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(totals, *(sp.sums for sp in spread.values()))
        sums["loss"], sums["n"] = float(totals[0]), int(totals[1])
        n = sums["n"]
        stds = {net: sp.std(n) for net, sp in spread.items()}
        record = {
            "epoch": epoch + 1,
            "loss": sums["loss"] / n,
            "lr": float(schedule[min((epoch + 1) * steps_per_epoch - 1, len(schedule) - 1)]),
            "cnn_embedding_std": stds["cnn"],
            "vit_embedding_std": stds["vit"],
            "healthy_embedding_std": healthy,
            "images_per_second": n / seconds,
            "epoch_seconds": seconds,
        }
        history.append(record)
        log.info(
            "pretrain epoch %d/%d: loss %.4f, embedding std CNN %.4f / ViT %.4f (healthy %.4f), %.0f img/s",
            epoch + 1,
            cfg.epochs,
            record["loss"],
            stds["cnn"],
            stds["vit"],
            healthy,
            record["images_per_second"],
        )
        warn_collapse("CASS", record, healthy_of, cfg.collapse_warn_fraction)
        if not ctx.main:
            continue  # rank 0 alone checkpoints (plain state_dicts: resumable with any process count)
        save_checkpoint(
            {
                "cnn": unwrap(cnn).state_dict(),
                "vit": unwrap(vit).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "history": history,
                "fingerprint": fingerprint,
            },
            ckpt_path,
        )
        for cb in callbacks:
            cb(epoch + 1, record)

    if not ctx.main:
        distributed.barrier()  # return once rank 0 has written the outputs
        return out
    last = history[-1]
    write_outputs(out, params, info, {"cnn": cnn, "vit": vit}, history, {
        "images": len(dataset),
        "cnn_embedding_std": last["cnn_embedding_std"],
        "vit_embedding_std": last["vit_embedding_std"],
        "healthy_embedding_std": healthy,
        "collapsed": bool(collapsed_networks(last, healthy_of, cfg.collapse_warn_fraction)),
        "precision": precision.name,
        "device": str(device),
        "processes": ctx.world_size,
    })
    distributed.barrier()
    return out
