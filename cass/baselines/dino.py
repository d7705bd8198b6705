"""The DINO baseline: self-distillation with no labels (Caron et al. 2021), over the same backbones as CASS.

Each network (the CNN and the ViT) gets its own DINO: a student and an EMA teacher of the same
architecture, each a backbone from :func:`cass.models.create_network` plus the DINO projection head
(MLP, l2 bottleneck, weight-normalised last layer). The student sees 2 global and N local crops, the
teacher only the 2 global ones; the teacher's outputs are centred (momentum 0.9) and sharpened (low
temperature). AdamW with the linear-scaling learning rate, a cosine weight-decay schedule 0.04 -> 0.4,
per-parameter gradient clipping at 3.0, the last layer frozen in the first epoch, and a cosine teacher
momentum 0.996 -> 1 follow the official recipe. Nothing needs a distributed process group.

Both networks train on the same multi-crop batches, each with its own optimiser, so one run yields a
DINO-pretrained CNN and a DINO-pretrained ViT in the same files as CASS pretraining (``cnn.safetensors``,
``vit.safetensors``, ``networks.json``, ``metrics.json``, ``history.csv``); ``cass finetune`` loads them
like CASS weights (the timm embedding head is saved at its initial values; fine-tuning replaces it).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cass import distributed
from cass.config import NETWORKS, DinoConfig, Network, Params
from cass.data.dataset import EpochLoader, ImageDataset
from cass.data.transforms import MultiCropTransform
from cass.layout import PretrainOutputs
from cass.losses import DINOLoss, EmbeddingSpread
from cass.models import create_network
from cass.pretrain import (
    _fingerprint,
    collapsed_networks,
    pretraining_pool,
    warn_collapse,
    write_outputs,
)
from cass.training import (
    EpochCallback,
    Precision,
    autocast,
    check_finite,
    cosine_schedule,
    epoch_seed,
    load_checkpoint,
    resolve_device,
    resolve_num_workers,
    resolve_precision,
    save_checkpoint,
    seed_everything,
)

log = logging.getLogger(__name__)



class DINOHead(nn.Module):
    """MLP -> l2-normalised bottleneck -> weight-normalised linear layer to ``out_dim`` prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            blocks: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (layers - 1)
            for a, b in itertools.pairwise(dims):
                blocks += [nn.Linear(a, b), *([nn.BatchNorm1d(b)] if use_bn else []), nn.GELU()]
            blocks.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*blocks)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        if norm_last_layer:
            magnitude.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropNetwork(nn.Module):
    """A backbone and the DINO head; crops of one size go through the backbone as one batch."""

    def __init__(self, backbone: nn.Module, head: DINOHead, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.channels_last = channels_last

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone features, head outputs) for all crops, stacked in crop order."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.features(torch.cat(list(crops[start:end]))))
            start = end
        f = torch.cat(feats)
        return f, self.head(f)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} parameters, student {len(s)}; they must share an architecture")
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is capped at ``clip`` on its own."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def local_crop_size(cfg: DinoConfig, image_size: int, vit: nn.Module | None = None) -> int:
    """``dino.local_crop_size``, or 96/224 of the image size rounded to a multiple of the ViT patch."""
    patch = 1
    if vit is not None and hasattr(vit, "patch_embed"):
        patch = int(vit.patch_embed.patch_size[0])
    if cfg.local_crop_size is not None:
        return cfg.local_crop_size
    return max(patch, round(image_size * 96 / 224 / patch) * patch)


def base_lr(cfg: DinoConfig, effective_batch: int) -> float:
    return cfg.lr if cfg.lr is not None else 5e-4 * effective_batch / 256


@dataclass(frozen=True)
class DinoSchedules:
    """Per optimiser step: lr, weight decay, teacher momentum; per epoch: teacher temperature."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def build(
        cls, cfg: DinoConfig, lr: float, min_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int
    ) -> DinoSchedules:
        total = epochs * steps_per_epoch
        warm = min(cfg.warmup_teacher_temp_epochs, epochs)
        temp = np.concatenate(
            [np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm), np.full(epochs - warm, cfg.teacher_temp)]
        )
        return cls(
            lr=cosine_schedule(lr, min_lr, total, warmup_epochs * steps_per_epoch),
            weight_decay=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total),
            momentum=cosine_schedule(cfg.momentum_teacher, 1.0, total),
            teacher_temp=temp,
        )


class DinoLearner:
    """One network's DINO: student, EMA teacher (never given gradients), centring loss, AdamW.

    As in the official code, biases and 1-d parameters (norms) get no weight decay, and the teacher stays
    in training mode (batch statistics in BatchNorm) but is updated only by :func:`ema_update`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        cfg: DinoConfig,
        device: torch.device,
        precision: Precision,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        head = DINOHead(
            backbone.num_features,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_layers,
            cfg.use_bn_in_head,
            cfg.norm_last_layer,
        )
        backbone.get_classifier().requires_grad_(False)  # the embedding head is not part of DINO
        self.cfg = cfg
        self.device = device
        self.precision = precision
        self.student = MultiCropNetwork(backbone, head, channels_last).to(device)
        if channels_last:
            self.student.backbone.to(memory_format=torch.channels_last)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.criterion = DINOLoss(cfg.out_dim, 2 + cfg.local_crops, cfg.student_temp, cfg.center_momentum).to(device)
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, weight_decay=cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
        self._student = torch.compile(self.student) if compile else self.student
        self._teacher = torch.compile(self.teacher) if compile else self.teacher
        self.ddp: nn.Module = self.student  # DDP-wrapped by distribute() when several processes train

    def distribute(self, sync_batchnorm: bool = False, compile: bool = False) -> None:
        """Several processes (torchrun): DDP averages the student's gradients; with ``sync_batchnorm``
        (CUDA) student and teacher normalise over the global batch, as in the official DINO."""
        if distributed.world_size() == 1:
            return
        self.student, self.ddp = distributed.wrap(
            self.student, self.device, sync_batchnorm=sync_batchnorm, key="pretrain.sync_batchnorm"
        )
        if sync_batchnorm:
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
            self._teacher = torch.compile(self.teacher) if compile else self.teacher
        self._student = torch.compile(self.ddp) if compile else self.ddp

    @classmethod
    def from_params(
        cls, params: Params, network: Network, device: torch.device, precision: Precision
    ) -> DinoLearner:
        m, cfg = params.model, params.pretrain
        arch, weights = (m.cnn, m.cnn_weights) if network == "cnn" else (m.vit, m.vit_weights)
        backbone = create_network(
            arch, m.embed_dim, network, m.image_size, m.pretrained, weights, key=f"model.{network}", dynamic_size=True
        )
        channels_last = cfg.channels_last and device.type == "cuda" and network == "cnn"
        return cls(backbone, cfg.dino, device, precision, channels_last, cfg.compile)

    def train(self) -> None:
        self.student.train()
        self.teacher.train()

    def forward_loss(self, crops: Sequence[torch.Tensor], teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The DINO loss of one batch of crops, and the student's features of the first global crop."""
        if len(crops) != 2 + self.cfg.local_crops:
            raise ValueError(f"expected 2 global + {self.cfg.local_crops} local crops, got {len(crops)} crops")
        with autocast(self.device, self.precision):
            with torch.no_grad():
                _, t_out = self._teacher(crops[:2])
            feats, s_out = self._student(crops)
        loss = self.criterion(s_out, t_out, teacher_temp)
        return loss, feats[: len(crops[0])].detach()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, lr: float, weight_decay: float, momentum: float, freeze_last_layer: bool) -> None:
        """Clip, (maybe) cancel the last layer's gradients, take the AdamW step, update the teacher."""
        self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad > 0:
            clip_gradients(self.student, self.cfg.clip_grad)
        if freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = weight_decay
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, self.student, momentum)

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "center": self.criterion.center.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.criterion.center.copy_(state["center"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def pretrain_dino(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    *,
    resume: bool = True,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
) -> PretrainOutputs:
    """DINO-pretrain the CNN and the ViT (each its own student/teacher) on the pretraining pool."""
    cfg, dino, m = params.pretrain, params.pretrain.dino, params.model
    out = PretrainOutputs(Path(out_dir))
    out.out_dir.mkdir(parents=True, exist_ok=True)
    rows, info = pretraining_pool(params, Path(data_dir))
    fingerprint = _fingerprint(params, Path(data_dir))

    ctx = distributed.setup(resolve_device(cfg.device))
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(params.seed)
    learners = {net: DinoLearner.from_params(params, net, device, precision) for net in NETWORKS}
    for net, learner in learners.items():
        learner.distribute(cfg.sync_batchnorm and net == "cnn", cfg.compile)
    local_size = local_crop_size(dino, m.image_size, learners["vit"].student.backbone)
    transform = MultiCropTransform(
        m.image_size, local_size, dino.local_crops, dino.global_crop_scale, dino.local_crop_scale, params.augment
    )
    dataset = ImageDataset(Path(info.root), rows["path"].tolist(), transform, max_pixels=params.data.max_image_pixels)
    drop_last = len(dataset) > cfg.batch_size  # a last batch of one breaks BatchNorm
    # batch_size is the global batch: each process loads its share of one permutation per epoch.
    local_batch = distributed.local_batch_size(cfg.batch_size, "pretrain.batch_size")
    workers = resolve_num_workers(cfg.num_workers, device, distributed.local_world_size())
    sampler = distributed.sampler(dataset, shuffle=True, seed=params.seed, drop_last=drop_last)
    batches = len(sampler) // local_batch if drop_last else math.ceil(len(sampler) / local_batch)
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    lr = base_lr(dino, cfg.batch_size * cfg.accumulate)
    sched = DinoSchedules.build(dino, lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs)

    start_epoch, history = 0, []
    ckpt_path = out.dino_checkpoint
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("fingerprint") == fingerprint:
            for net, learner in learners.items():
                learner.load_state_dict(state[net])
            start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
            log.info("resuming DINO pretraining from %s after epoch %d", ckpt_path, start_epoch)
        else:
            log.warning("%s was made with other settings or data; starting from scratch", ckpt_path)

    healthy = {net: 1.0 / math.sqrt(lrn.student.backbone.num_features) for net, lrn in learners.items()}
    log.info(
        "DINO pretraining: %s and %s, %d images, 2 x %d px + %d x %d px crops, batch %d x %d, lr %.2g, %s on %s",
        m.cnn,
        m.vit,
        len(dataset),
        m.image_size,
        dino.local_crops,
        local_size,
        cfg.batch_size,
        cfg.accumulate,
        lr,
        precision.name,
        device,
    )
    loaders = EpochLoader(dataset, sampler, local_batch, workers, drop_last, pin_memory=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        loader = loaders.for_epoch(epoch_seed(params.seed, epoch), epoch, ctx.rank)
        for learner in learners.values():
            learner.train()
        teacher_temp = float(sched.teacher_temp[epoch])
        freeze = epoch < dino.freeze_last_layer_epochs
        losses = {net: 0.0 for net in NETWORKS}
        spread = {net: EmbeddingSpread(lrn.student.backbone.num_features, device) for net, lrn in learners.items()}
        n = 0
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"dino {epoch + 1}/{cfg.epochs}",
            disable=None if progress and ctx.main else True,
            leave=False,
            unit="batch",
        )
        for i, (crops, _) in enumerate(bar):
            crops = [c.to(device, non_blocking=True) for c in crops]
            group_size = min(cfg.accumulate, batches - (i // cfg.accumulate) * cfg.accumulate)
            step = min(epoch * steps_per_epoch + i // cfg.accumulate, len(sched.lr) - 1)
            last_of_group = (i + 1) % cfg.accumulate == 0 or i + 1 == batches
            for net, learner in learners.items():
                with distributed.no_sync((learner.ddp,), enabled=not last_of_group):
                    loss, feats = learner.forward_loss(crops, teacher_temp)
                    check_finite(loss, f"DINO {net} pretraining epoch {epoch + 1}, batch {i + 1}")
                    learner.backward(loss / group_size)
                if last_of_group:
                    learner.step(
                        float(sched.lr[step]), float(sched.weight_decay[step]), float(sched.momentum[step]), freeze
                    )
                spread[net].add(feats)
                losses[net] += loss.item() * len(crops[0])
            n += len(crops[0])
            bar.set_postfix(loss=f"{losses['vit'] / n:.3f}", img_s=f"{n / (time.perf_counter() - started):.0f}")
        seconds = time.perf_counter() - started
        # Metrics over the global epoch: sum the per-process sums (each loss itself stayed local).
        totals = torch.tensor([losses["cnn"], losses["vit"], n], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(totals, *(sp.sums for sp in spread.values()))
        losses["cnn"], losses["vit"], n = float(totals[0]), float(totals[1]), int(totals[2])
        record: dict[str, float] = {"epoch": epoch + 1}
        for net in NETWORKS:
            record[f"{net}_loss"] = losses[net] / n
            record[f"{net}_embedding_std"] = spread[net].std(n)
            record[f"{net}_healthy_embedding_std"] = healthy[net]
        record.update(
            loss=(record["cnn_loss"] + record["vit_loss"]) / 2,
            lr=float(sched.lr[min((epoch + 1) * steps_per_epoch - 1, len(sched.lr) - 1)]),
            teacher_momentum=float(sched.momentum[min((epoch + 1) * steps_per_epoch - 1, len(sched.momentum) - 1)]),
            teacher_temp=teacher_temp,
            images_per_second=n / seconds,
            epoch_seconds=seconds,
        )
        history.append(record)
        log.info(
            "DINO epoch %d/%d: loss CNN %.4f / ViT %.4f, feature std CNN %.4f / ViT %.4f, %.0f img/s",
            epoch + 1,
            cfg.epochs,
            record["cnn_loss"],
            record["vit_loss"],
            record["cnn_embedding_std"],
            record["vit_embedding_std"],
            record["images_per_second"],
        )
        warn_collapse("DINO", record, healthy, cfg.collapse_warn_fraction)
        if not ctx.main:
            continue  # rank 0 alone checkpoints (plain state_dicts: resumable with any process count)
        save_checkpoint(
            {
                **{net: learner.state_dict() for net, learner in learners.items()},
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
    backbones = {net: learner.student.backbone for net, learner in learners.items()}
    write_outputs(out, params, info, backbones, history, {
        "cnn_final_loss": last["cnn_loss"],
        "vit_final_loss": last["vit_loss"],
        "images": len(dataset),
        "cnn_embedding_std": last["cnn_embedding_std"],
        "vit_embedding_std": last["vit_embedding_std"],
        "cnn_healthy_embedding_std": healthy["cnn"],
        "vit_healthy_embedding_std": healthy["vit"],
        "collapsed": bool(collapsed_networks(last, healthy, cfg.collapse_warn_fraction)),
        "local_crop_size": local_size,
        "base_lr": lr,
        "precision": precision.name,
        "device": str(device),
        "processes": ctx.world_size,
    }, method="dino")
    distributed.barrier()
    return out
