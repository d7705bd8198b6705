"""Pieces shared by the pretraining and fine-tuning loops: device, precision, schedules, checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cass.config import TrainerConfig
from cass.errors import ConfigError, TrainingError
from cass.io import atomic_path

EpochCallback = Callable[[int, Mapping[str, float]], None]
"""Called after every epoch with (epoch, metrics); MLflow logging and Optuna pruning plug in here."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; set device: auto or cpu")
    return device


MAX_AUTO_WORKERS = 8


def resolve_num_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """DataLoader workers for ``num_workers: auto`` (an integer is kept as it is).

    Training on the CPU already keeps every core busy with the model's own threads: loader workers would
    only take cores from it, so auto loads in the main process. On an accelerator the cores are free for
    decoding and augmenting: auto gives each of the ``processes`` training processes on this machine its
    share of the cores, one left for the training process itself, at most MAX_AUTO_WORKERS.
    """
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores // max(processes, 1) - 1))


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype, None = full fp32
    scaler: bool  # fp16 needs loss scaling

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(choice: str, device: torch.device) -> Precision:
    if choice == "fp32" or (choice == "auto" and device.type != "cuda"):
        return Precision(None, False)
    if device.type != "cuda":
        raise ConfigError(f"precision '{choice}' needs a CUDA device (device is {device}); use auto or fp32")
    if choice == "fp16":
        return Precision(torch.float16, True)
    if torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, False)
    if choice == "bf16":
        raise ConfigError("precision 'bf16' is not supported by this GPU; use auto or fp16")
    return Precision(torch.float16, True)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: augmentations and order depend on (seed, epoch) only, so resuming at an
    epoch boundary replays exactly what an uninterrupted run would have done."""
    return seed * 100_003 + epoch


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Per-step learning rates: linear warm-up, then cosine annealing from ``base`` to ``final``."""
    warm = np.linspace(0.0, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    rest = max(total_steps - warmup_steps, 1)
    steps = np.arange(rest)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / rest))
    return np.concatenate([warm, cosine])[:total_steps]


def make_optimizer(cfg: TrainerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Step the parameters (through the fp16 loss scaler), then zero the gradients: the public CASS
    notebook never zeroed them, so they accumulated over the whole run."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"non-finite loss ({loss.item()}) at {where}; stopping. Lower the learning rate, use fp32, "
            "or check the input images."
        )


# --------------------------------------------------------------------------------------------------
# Files


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DDP wrappers (their state_dict keys carry prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def tensor_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state: about the size of its file, for a full disk's message."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(v) for v in state)
    return 0


def save_weights(model: nn.Module, path: Path) -> Path:
    """Save a state_dict as safetensors, atomically (never a pickled model)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(path, needed=tensor_bytes(state)) as tmp:
        save_file(state, str(tmp))
    return path


def load_weights_file(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError(f"{path}: weights not found; run the stage that produces it first")
    unwrap(model).load_state_dict(load_file(str(path)))


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """torch.save of plain state_dicts and numbers, written atomically; read with weights_only=True."""
    with atomic_path(path, needed=tensor_bytes(state)) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise TrainingError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to restart"
        ) from None
