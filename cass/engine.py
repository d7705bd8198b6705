"""One training engine for every stage: CASS and DINO pretraining and fine-tuning are learners it runs.

The engine owns what every training loop needs and no method should write again: the device, precision
(autocast, fp16 loss scaling), channels_last and ``torch.compile``, DistributedDataParallel, the sampler
and the persistent :class:`~cass.data.dataset.EpochLoader`, the per-step learning-rate schedule,
gradient accumulation (DDP's ``no_sync`` on all but the last micro-batch), the epoch loop with its
progress bar (rank 0), the all-reduce of the epoch's metrics, the stop on a non-finite loss, resuming at
an epoch boundary from an atomic checkpoint guarded by a fingerprint, the epoch callbacks (MLflow
logging, Optuna pruning) and writing on rank 0 alone. Where no progress bar shows (no terminal: a
Prefect worker, a log file), a long epoch logs progress lines instead (:class:`ProgressLog`).

A :class:`Learner` is the method: its ``step`` takes one batch through forward, loss and backward; the
engine decides when its optimiser steps (``optimizer_step``), what learning rate it uses, and when an
epoch ends (``end_epoch`` turns the epoch's statistics into the record that goes to the history and the
callbacks). This is the split of Lightning's Trainer and LightningModule, or of DINO's ``train_dino``
and ``train_one_epoch``: a new method is a new learner, never a new loop.

    engine = Engine(params.pretrain, seed=params.seed, key="pretrain")
    learner = CassLearner(params, engine)        # builds its networks right after the engine seeded
    engine.data(dataset, full_batches=True)
    history = engine.fit(learner, Checkpoint(path, fingerprint))
    engine.finish(lambda: write_outputs(...))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cass import distributed, training
from cass.config import TrainerConfig
from cass.data.dataset import EpochLoader
from cass.errors import TrainingError
from cass.io import clean_stale
from cass.losses import EmbeddingSpread

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
"""Seconds at least between two progress lines of an epoch in a log (there are at most 10 per epoch)."""

ENGINE_KEYS = ("epoch", "history", "fingerprint")
"""What the engine itself keeps in a checkpoint, beside the learner's ``state_dict``."""


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable hash of what a checkpoint depends on (settings, data and initial weights)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's content, read in chunks (weights files can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class Step:
    """Where one micro-batch stands. ``index`` is the optimiser step over the whole run (the row of
    every per-step schedule); each loss is divided by ``divisor``, the micro-batches of its accumulation
    group, and the optimiser steps after the group's ``last`` one."""

    epoch: int = 0
    batch: int = 0
    index: int = 0
    lr: float = 0.0
    divisor: int = 1
    last: bool = True


@dataclass
class StepOutput:
    """What a learner's step returns: its losses (each checked finite, then averaged per image over the
    epoch) and the embeddings whose spread, the collapse indicator, is measured over the epoch."""

    losses: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochStats:
    """One epoch over every process: images, seconds, the lr of its last step (``last_step``: that
    step's index), mean losses per image, and each embedding's spread with its healthy value."""

    epoch: int  # 1-based
    epochs: int
    images: int
    seconds: float
    lr: float
    last_step: int
    losses: dict[str, float]
    spread: dict[str, float]
    healthy: dict[str, float]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


@dataclass(frozen=True)
class Checkpoint:
    """Where the engine checkpoints after every epoch, and the fingerprint a checkpoint must carry to be
    resumed. A checkpoint not ``keep``-t is removed once the stage has written its outputs, so a later
    run does not resume a finished one."""

    path: Path
    fingerprint: str
    resume: bool = True
    keep: bool = True
    restart_hint: str = "delete it to start over"


class Updater:
    """One optimiser and its gradient scaler (fp16 loss scaling; transparent otherwise)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, precision: training.Precision) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)

    def backward(self, loss: torch.Tensor, divisor: int = 1) -> None:
        self.scaler.scale(loss / divisor).backward()

    def unscale(self) -> None:
        """Gradients at their true scale, before clipping them."""
        self.scaler.unscale_(self.optimizer)

    def step(self, lr: float) -> None:
        training.set_lr(self.optimizer, lr)
        training.optimizer_step(self.optimizer, self.scaler)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class Learner(ABC):
    """A method the engine trains: CASS, DINO, fine-tuning.

    ``name`` appears in the progress bar and in messages; ``peak_lr`` is the top of the engine's cosine
    learning-rate schedule. Its ``state_dict`` is what a checkpoint keeps beside :data:`ENGINE_KEYS`.
    """

    name: str = "training"
    peak_lr: float

    def begin(self, start_epoch: int) -> dict[str, float] | None:
        """Before the first epoch this call trains (``start_epoch`` > 0 after a resume): a record to give
        the callbacks at step ``start_epoch`` (a measurement of the starting point), or None."""
        return None

    def start_epoch(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Before the first batch of ``epoch`` (0-based): training modes, per-epoch settings."""

    @abstractmethod
    def step(self, batch: Any, step: Step) -> StepOutput:
        """One micro-batch on the device: forward, loss, backward (the loss divided by ``step.divisor``)."""

    @abstractmethod
    def optimizer_step(self, step: Step) -> None:
        """The optimiser step after an accumulation group, at ``step.lr``; then zero the gradients."""

    @abstractmethod
    def end_epoch(self, stats: EpochStats) -> dict[str, float]:
        """The epoch's record (history row, callbacks' metrics), from the engine's statistics."""

    def should_stop(self) -> bool:
        """True to end training before ``epochs`` (early stopping)."""
        return False

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _channels_last_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


class EpochMeter:
    """Per-image loss sums, the image count and embedding spreads of one epoch on this process.

    The sums stay on the device (float64, the same arithmetic as summing ``loss.item() * images`` in Python):
    adding a step's losses never waits for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.spread: dict[str, EmbeddingSpread] = {}
        self.images = 0

    def add(self, images: int, out: StepOutput) -> None:
        for name, loss in out.losses.items():
            term = loss.detach().double() * images
            self.sums[name] = self.sums[name].add_(term) if name in self.sums else term
        for name, z in out.embeddings.items():
            if name not in self.spread:
                self.spread[name] = EmbeddingSpread(z.shape[-1], z.device)
            self.spread[name].add(z)
        self.images += images

    def reduce(self) -> tuple[int, dict[str, float]]:
        """(images, mean losses) over every process; the spreads' sums are reduced in place."""
        count = torch.tensor([self.images], dtype=torch.float64, device=self.device)
        totals = torch.cat([*(t.reshape(1).to(self.device) for t in self.sums.values()), count])
        distributed.all_reduce_sum(totals, *(sp.sums for sp in self.spread.values()))
        images = int(totals[-1])
        return images, {name: float(t) / max(images, 1) for name, t in zip(self.sums, totals[:-1], strict=True)}


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: a duration as a progress line shows it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLog:
    """Progress lines of one epoch where no progress bar shows: the batch of the total, the time spent,
    and the time left in the epoch and in the stage, e.g. ``CASS pretraining epoch 3/20: batch 96/480
    (20%), 0m48s elapsed, ETA 3m12s for the epoch, 54m40s for the stage``.

    A line each time another tenth of the epoch is done, once :data:`PROGRESS_EVERY_S` have passed since
    the previous one: short epochs log none (their epoch line suffices), long ones about every 30 s."""

    def __init__(self, name: str, epoch: int, epochs: int, batches: int, every_s: float | None = None) -> None:
        self.name, self.epoch, self.epochs, self.batches = name, epoch, epochs, batches
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.started = self.last = time.perf_counter()
        self.next_tenth = 1

    def update(self, done: int) -> None:
        """``done`` batches of the epoch are finished."""
        now = time.perf_counter()
        if done >= self.batches or done * 10 < self.next_tenth * self.batches or now - self.last < self.every_s:
            return
        self.next_tenth = done * 10 // self.batches + 1
        self.last = now
        elapsed = now - self.started
        per_batch = elapsed / done
        left = (self.batches - done) * per_batch
        stage = left + (self.epochs - self.epoch) * self.batches * per_batch
        log.info("%s epoch %d/%d: batch %d/%d (%d%%), %s elapsed, ETA %s for the epoch, %s for the stage",
                 self.name, self.epoch, self.epochs, done, self.batches, 100 * done // self.batches,
                 duration(elapsed), duration(left), duration(stage))


class Engine:
    """Runs a :class:`Learner` under one stage's :class:`~cass.config.TrainerConfig`.

    Construction joins the process group (torchrun), picks the device and precision and seeds every
    generator, so a learner built right after draws its initial weights from ``seed``. ``key`` names the
    settings section in messages (``pretrain``, ``finetune``).
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        seed: int,
        key: str,
        callbacks: Sequence[training.EpochCallback] = (),
        progress: bool = True,
    ) -> None:
        self.cfg, self.seed, self.key = cfg, seed, key
        self.callbacks, self.progress = tuple(callbacks), progress
        self.ctx = distributed.setup(training.resolve_device(cfg.device))
        self.device = self.ctx.device
        self.precision = training.resolve_precision(cfg.precision, self.device)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        self._ddp: list[nn.Module] = []
        self._loaders: EpochLoader | None = None
        self.batches = self.steps_per_epoch = 0
        training.seed_everything(seed)

    @property
    def main(self) -> bool:
        """Rank 0: the process that shows progress, checkpoints, calls back and writes."""
        return self.ctx.main

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    # -- what learners build with ----------------------------------------------------------------

    def module(
        self,
        model: nn.Module,
        *,
        channels_last: nn.Module | None = None,
        sync_batchnorm: bool = False,
        find_unused_parameters: bool = False,
    ) -> tuple[nn.Module, nn.Module]:
        """(plain ``model`` on the device, the module to call for training): DDP-wrapped with several
        processes, compiled with ``compile``. The plain one is saved, validated and loaded into.
        ``channels_last`` names the submodule (the CNN) whose weights and inputs take that layout on CUDA."""
        model.to(self.device)
        if channels_last is not None and self.channels_last:
            channels_last.to(memory_format=torch.channels_last)
            channels_last.register_forward_pre_hook(_channels_last_input)
        model, ddp = distributed.wrap(
            model, self.device, sync_batchnorm=sync_batchnorm, key=f"{self.key}.sync_batchnorm",
            find_unused_parameters=find_unused_parameters,
        )
        if ddp is not model:
            self._ddp.append(ddp)
        return model, self.compiled(ddp)

    def compiled(self, model: nn.Module) -> nn.Module:
        return torch.compile(model) if self.cfg.compile else model

    def updater(self, optimizer: torch.optim.Optimizer) -> Updater:
        return Updater(optimizer, self.device, self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' precision (networks only: losses run in fp32)."""
        return training.autocast(self.device, self.precision)

    def schedule(self, base: float, final: float, warmup_epochs: int = 0) -> np.ndarray:
        """A per-optimiser-step cosine schedule over the run (call after :meth:`data`)."""
        steps = self.steps_per_epoch
        return training.cosine_schedule(base, final, steps * self.cfg.epochs, steps * warmup_epochs)

    def data(self, dataset: Dataset, *, full_batches: bool) -> None:
        """Shard ``dataset`` among the processes, one seeded permutation per epoch.

        ``batch_size`` is the global batch. ``full_batches`` (self-supervised pretraining) drops an
        incomplete last batch whenever there is more than one; otherwise (fine-tuning: every labelled
        image counts) only a last batch of one is dropped, since it breaks BatchNorm."""
        cfg = self.cfg
        local = distributed.local_batch_size(cfg.batch_size, f"{self.key}.batch_size")
        workers = training.resolve_num_workers(cfg.num_workers, self.device, distributed.local_world_size())
        drop_last = full_batches and len(dataset) > cfg.batch_size  # type: ignore[arg-type]
        sampler = distributed.sampler(dataset, shuffle=True, seed=self.seed, drop_last=drop_last)
        if not full_batches:
            drop_last = len(sampler) > local and len(sampler) % local == 1
        self.batches = len(sampler) // local if drop_last else math.ceil(len(sampler) / local)
        self.steps_per_epoch = math.ceil(self.batches / cfg.accumulate)
        self._loaders = EpochLoader(dataset, sampler, local, workers, drop_last,  # type: ignore[arg-type]
                                    pin_memory=self.device.type == "cuda")

    def describe(self) -> str:
        return f"batch {self.cfg.batch_size} x {self.cfg.accumulate}, {self.precision.name} on {self.device}"

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, learner: Learner, checkpoint: Checkpoint | None = None) -> list[dict[str, float]]:
        """Train ``learner`` for the remaining epochs; returns the history of every epoch (resumed ones too).

        Rank 0 checkpoints after each epoch, then calls the callbacks: a callback that raises (an
        interruption, a pruned trial) leaves a checkpoint that resumes after that epoch."""
        loaders = self._loaders
        if loaders is None:
            raise RuntimeError("Engine.fit before Engine.data: the engine has no training data")
        lrs = self.schedule(learner.peak_lr, self.cfg.min_lr, self.cfg.warmup_epochs)
        start, history = self._resume(learner, checkpoint)
        before = learner.begin(start) if start < self.cfg.epochs else None
        if before is not None and self.main:
            for cb in self.callbacks:
                cb(start, before)
        for epoch in range(start, self.cfg.epochs):
            if learner.should_stop():
                break
            record = learner.end_epoch(self._epoch(learner, loaders, epoch, lrs))
            history.append(record)
            if not self.main:
                continue
            if checkpoint is not None:
                self._save(learner, checkpoint, epoch, history)
            for cb in self.callbacks:
                cb(epoch + 1, record)
        return history

    def finish(self, write: Callable[[], object], checkpoint: Checkpoint | None = None) -> None:
        """Rank 0 writes the stage's outputs (then removes a checkpoint not kept); every rank returns
        once they are written."""
        if self.main:
            write()
            if checkpoint is not None and not checkpoint.keep:
                checkpoint.path.unlink(missing_ok=True)
        distributed.barrier()

    def _epoch(self, learner: Learner, loaders: EpochLoader, epoch: int, lrs: np.ndarray) -> EpochStats:
        loader = loaders.for_epoch(training.epoch_seed(self.seed, epoch), epoch, self.ctx.rank)
        learner.start_epoch(epoch)
        meter = EpochMeter(self.device)
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"{learner.name} {epoch + 1}/{self.cfg.epochs}", leave=False, unit="batch",
                   disable=None if self.progress and self.main else True)
        # No bar because there is no terminal (tqdm's choice): progress lines in the log instead.
        lines = (ProgressLog(learner.name, epoch + 1, self.cfg.epochs, self.batches)
                 if self.progress and self.main and bar.disable else None)
        for i, batch in enumerate(bar):
            out = self.train_batch(learner, batch, self._step(epoch, i, lrs), meter)
            if not bar.disable:  # the losses leave the device only for a bar someone sees
                shown = {name: f"{loss.item():.4f}" for name, loss in out.losses.items()}
                bar.set_postfix(shown, refresh=False, img_s=f"{meter.images / (time.perf_counter() - started):.0f}")
            if lines is not None:
                lines.update(i + 1)
        seconds = time.perf_counter() - started
        images, losses = meter.reduce()
        last = min((epoch + 1) * self.steps_per_epoch - 1, len(lrs) - 1)
        return EpochStats(
            epoch + 1, self.cfg.epochs, images, seconds, float(lrs[last]), last, losses,
            spread={name: sp.std(images) for name, sp in meter.spread.items()},
            healthy={name: 1.0 / math.sqrt(sp.sums.shape[-1]) for name, sp in meter.spread.items()},
        )

    def _step(self, epoch: int, i: int, lrs: np.ndarray) -> Step:
        acc = self.cfg.accumulate
        group_start = (i // acc) * acc
        index = min(epoch * self.steps_per_epoch + i // acc, len(lrs) - 1)
        last = (i + 1) % acc == 0 or i + 1 == self.batches
        return Step(epoch, i, index, float(lrs[index]), min(acc, self.batches - group_start), last)

    def train_batch(self, learner: Learner, batch: Any, step: Step, meter: EpochMeter) -> StepOutput:
        """Everything the loop does with one batch: to the device, the learner's step (and its optimiser step
        after an accumulation group), the finiteness check, the epoch's sums. benchmarks/pretrain_step.py
        times it against a bare step of the same networks."""
        out = self._micro_batch(learner, _to_device(batch, self.device), step)
        meter.add(len(batch[-1]), out)  # batches are (inputs, targets)
        return out

    def _micro_batch(self, learner: Learner, batch: Any, step: Step) -> StepOutput:
        with distributed.no_sync(self._ddp, enabled=not step.last):
            out = learner.step(batch, step)
        for name, loss in out.losses.items():
            which = f" ({name})" if len(out.losses) > 1 else ""
            training.check_finite(loss, f"{learner.name}{which}, epoch {step.epoch + 1}, batch {step.batch + 1}")
        if step.last:
            learner.optimizer_step(step)
        return out

    def _resume(self, learner: Learner, checkpoint: Checkpoint | None) -> tuple[int, list[dict[str, float]]]:
        if checkpoint is not None and self.main:
            for stale in clean_stale(checkpoint.path.parent):  # temporary files of writes killed earlier
                log.info("removed %s, left by an interrupted run", stale)
        if checkpoint is None or not checkpoint.resume or not checkpoint.path.is_file():
            return 0, []
        state = training.load_checkpoint(checkpoint.path)
        if state.get("fingerprint") != checkpoint.fingerprint:
            log.warning("%s was made with other settings or data; starting from scratch", checkpoint.path)
            return 0, []
        try:
            learner.load_state_dict(state)
            start, history = int(state["epoch"]) + 1, list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise TrainingError(
                f"{checkpoint.path}: this version cannot resume this checkpoint ({type(exc).__name__}: {exc}); "
                f"{checkpoint.restart_hint}"
            ) from None
        log.info("resuming %s from %s after epoch %d", learner.name, checkpoint.path, start)
        return start, history

    def _save(self, learner: Learner, checkpoint: Checkpoint, epoch: int, history: list[dict[str, float]]) -> None:
        """Plain state_dicts and numbers, written atomically: resumable with any number of processes."""
        state = learner.state_dict()
        if clash := set(state) & set(ENGINE_KEYS):
            raise ValueError(f"{type(learner).__name__}.state_dict uses the engine's keys {sorted(clash)}")
        training.save_checkpoint(
            {**state, "epoch": epoch, "history": history, "fingerprint": checkpoint.fingerprint}, checkpoint.path
        )
