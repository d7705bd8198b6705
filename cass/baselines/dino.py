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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cass.config import NETWORKS, DinoConfig, Network, Params
from cass.data.transforms import MultiCropTransform
from cass.ema import ema_update
from cass.engine import Engine, EpochStats, Step, StepOutput, Updater
from cass.losses import DINOLoss
from cass.models import create_network
from cass.outputs import PretrainOutputs
from cass.pretraining_common import PretrainingLearner
from cass.training import Precision, autocast, cosine_schedule

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
        optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, weight_decay=cfg.weight_decay
        )
        self.updater = Updater(optimizer, device, precision)
        self._student: nn.Module = self.student
        self._teacher: nn.Module = self.teacher

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.updater.optimizer

    def attach(self, engine: Engine, sync_batchnorm: bool = False) -> None:
        """Train under ``engine``: with several processes (torchrun) DDP averages the student's gradients,
        and with ``sync_batchnorm`` (CUDA) student and teacher normalise over the global batch, as in the
        official DINO; with ``compile`` both run compiled."""
        self.student, self._student = engine.module(self.student, sync_batchnorm=sync_batchnorm)
        if sync_batchnorm and engine.ctx.world_size > 1:
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self._teacher = engine.compiled(self.teacher)

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
        return cls(backbone, cfg.dino, device, precision, channels_last)

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

    def backward(self, loss: torch.Tensor, divisor: int = 1) -> None:
        self.updater.backward(loss, divisor)

    def optimizer_step(self, lr: float, weight_decay: float, momentum: float, freeze_last_layer: bool) -> None:
        """The optimiser step after the backward passes: clip, (maybe) cancel the last layer's gradients, take
        the AdamW step, update the teacher. (:meth:`DinoPretraining.step` is the engine's forward + backward.)"""
        self.updater.unscale()
        if self.cfg.clip_grad > 0:
            clip_gradients(self.student, self.cfg.clip_grad)
        if freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        self.optimizer.param_groups[0]["weight_decay"] = weight_decay
        self.updater.step(lr)
        ema_update(self.teacher, self.student, momentum)

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "center": self.criterion.center.detach().cpu(),
            **self.updater.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.criterion.center.copy_(state["center"])
        self.updater.load_state_dict(state)


class DinoPretraining(PretrainingLearner):
    """The DINO stage's learner: a :class:`DinoLearner` per network, both on the same multi-crop batches,
    each with its own optimiser; the engine's learning rate, plus DINO's own per-step weight decay and
    teacher momentum and per-epoch teacher temperature."""

    method = "dino"
    name = "DINO pretraining"
    epoch_log = (
        "DINO epoch %d/%d: loss CNN %.4f / ViT %.4f, feature std CNN %.4f / ViT %.4f, %.0f img/s",
        ("cnn_loss", "vit_loss", "cnn_embedding_std", "vit_embedding_std", "images_per_second"),
    )

    def __init__(self, params: Params, engine: Engine) -> None:
        super().__init__(params, engine)
        cfg, dino, m = params.pretrain, params.pretrain.dino, params.model
        self.networks = {net: DinoLearner.from_params(params, net, engine.device, engine.precision) for net in NETWORKS}
        for net, learner in self.networks.items():
            learner.attach(engine, cfg.sync_batchnorm and net == "cnn")
        self.local_size = local_crop_size(dino, m.image_size, self.networks["vit"].student.backbone)
        self.transform = MultiCropTransform(
            m.image_size, self.local_size, dino.local_crops, dino.global_crop_scale, dino.local_crop_scale,
            params.augment,
        )
        self.peak_lr = base_lr(dino, cfg.batch_size * cfg.accumulate)
        self.teacher_temp, self.freeze_last_layer = dino.teacher_temp, False

    @cached_property
    def schedules(self) -> DinoSchedules:
        cfg = self.params.pretrain
        spe = self.engine.steps_per_epoch
        return DinoSchedules.build(cfg.dino, self.peak_lr, cfg.min_lr, cfg.epochs, spe, cfg.warmup_epochs)

    @staticmethod
    def checkpoint_path(out: PretrainOutputs) -> Path:
        return out.dino_checkpoint

    def announce(self, images: int) -> None:
        m, dino = self.params.model, self.params.pretrain.dino
        log.info(
            "DINO pretraining: %s and %s, %d images, 2 x %d px + %d x %d px crops, lr %.2g, %s",
            m.cnn, m.vit, images, m.image_size, dino.local_crops, self.local_size, self.peak_lr,
            self.engine.describe(),
        )

    def start_epoch(self, epoch: int) -> None:
        for learner in self.networks.values():
            learner.train()
        self.teacher_temp = float(self.schedules.teacher_temp[epoch])
        self.freeze_last_layer = epoch < self.params.pretrain.dino.freeze_last_layer_epochs

    def step(self, batch: Any, step: Step) -> StepOutput:
        crops, out = batch[0], StepOutput({})
        for net, learner in self.networks.items():
            loss, out.embeddings[net] = learner.forward_loss(crops, self.teacher_temp)
            learner.backward(loss, step.divisor)
            out.losses[net] = loss
        return out

    def optimizer_step(self, step: Step) -> None:
        wd, momentum = self.schedules.weight_decay[step.index], self.schedules.momentum[step.index]
        for learner in self.networks.values():
            learner.optimizer_step(step.lr, float(wd), float(momentum), self.freeze_last_layer)

    def record(self, stats: EpochStats) -> dict[str, float]:
        record: dict[str, float] = {"epoch": stats.epoch}
        for net in NETWORKS:
            record[f"{net}_loss"] = stats.losses[net]
            record[f"{net}_embedding_std"] = stats.spread[net]
            record[f"{net}_healthy_embedding_std"] = stats.healthy[net]
        record.update(
            loss=(record["cnn_loss"] + record["vit_loss"]) / 2,
            lr=stats.lr,
            teacher_momentum=float(self.schedules.momentum[stats.last_step]),
            teacher_temp=self.teacher_temp,
            images_per_second=stats.images_per_second,
            epoch_seconds=stats.seconds,
        )
        return record

    def details(self, last: Mapping[str, float]) -> dict[str, Any]:
        return {
            **{f"{net}_final_loss": last[f"{net}_loss"] for net in NETWORKS},
            **{f"{net}_healthy_embedding_std": last[f"{net}_healthy_embedding_std"] for net in NETWORKS},
            "local_crop_size": self.local_size,
            "base_lr": self.peak_lr,
        }

    def backbones(self) -> dict[str, nn.Module]:
        return {net: learner.student.backbone for net, learner in self.networks.items()}

    def state_dict(self) -> dict[str, Any]:
        return {**{net: learner.state_dict() for net, learner in self.networks.items()}, **self.monitor_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for net, learner in self.networks.items():
            learner.load_state_dict(state[net])
        self.load_monitor_state(state)
