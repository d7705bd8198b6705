"""The training engine's own behaviour, on a toy learner (a linear model on fixed data) in a second."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from cass.config import TrainerConfig
from cass.engine import Checkpoint, Engine, EpochStats, Learner, Step, StepOutput
from cass.errors import TrainingError
from cass.training import cosine_schedule

IMAGES = 32


class Points(Dataset):
    """Fixed inputs and targets; like ImageDataset, indexed by (index, epoch seed)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(IMAGES, 4, generator=g), torch.randn(IMAGES, generator=g)

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, _seed = key
        return self.x[i], self.y[i]


class Toy(Learner):
    """Least squares with plain SGD; records what the engine asked of it."""

    name = "toy"

    def __init__(self, engine: Engine, nan_at: tuple[int, int] | None = None, stop_after: int | None = None) -> None:
        self.model, self._forward = engine.module(nn.Linear(4, 1))
        self.updater = engine.updater(torch.optim.SGD(self.model.parameters(), lr=0.0))
        self.peak_lr, self.nan_at, self.stop_after = 0.1, nan_at, stop_after
        self.lrs: list[float] = []
        self.epochs_ended = 0

    def step(self, batch: Any, step: Step) -> StepOutput:
        x, y = batch
        loss = ((self._forward(x).squeeze(-1) - y) ** 2).mean()
        if (step.epoch, step.batch) == self.nan_at:
            loss = loss * math.nan
        self.updater.backward(loss, step.divisor)
        return StepOutput({"loss": loss}, {"out": torch.cat([x, self._forward(x)], dim=1)})

    def optimizer_step(self, step: Step) -> None:
        self.lrs.append(step.lr)
        self.updater.step(step.lr)

    def end_epoch(self, stats: EpochStats) -> dict[str, float]:
        self.epochs_ended += 1
        return {"epoch": stats.epoch, "loss": stats.losses["loss"], "lr": stats.lr, "images": stats.images,
                "spread": stats.spread["out"], "healthy": stats.healthy["out"]}

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.epochs_ended >= self.stop_after

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), **self.updater.state_dict(), "ended": self.epochs_ended}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updater.load_state_dict(state)
        self.epochs_ended = state["ended"]


def train(epochs: int = 3, batch_size: int = 8, accumulate: int = 1, checkpoint: Checkpoint | None = None,
          callbacks=(), **toy) -> tuple[Toy, list[dict[str, float]]]:
    cfg = TrainerConfig(epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=0.1, min_lr=0.01,
                        warmup_epochs=1, device="cpu", num_workers=0)
    engine = Engine(cfg, seed=3, key="toy", callbacks=callbacks, progress=False)
    learner = Toy(engine, **toy)
    engine.data(Points(), full_batches=False)
    return learner, engine.fit(learner, checkpoint)


def weights(learner: Toy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def test_accumulated_micro_batches_step_like_one_large_batch() -> None:
    big, _ = train(batch_size=16)
    small, history = train(batch_size=8, accumulate=2)
    assert len(small.lrs) == len(big.lrs) == 3 * 2  # 2 optimiser steps per epoch either way
    for a, b in zip(weights(big), weights(small), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [h["images"] for h in history] == [IMAGES] * 3


def test_learning_rate_warms_up_then_follows_the_cosine_per_optimizer_step() -> None:
    learner, history = train(batch_size=8, accumulate=2)
    expected = cosine_schedule(0.1, 0.01, total_steps=6, warmup_steps=2)
    assert learner.lrs == pytest.approx(list(expected))
    assert [h["lr"] for h in history] == pytest.approx(list(expected[1::2]))  # each epoch's last step


def test_a_non_finite_loss_stops_with_where_it_happened() -> None:
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at toy, epoch 2, batch 3; stopping"):
        train(nan_at=(1, 2))


def test_callbacks_get_every_epoch_once_its_checkpoint_is_written(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    seen: list[tuple[int, float, int]] = []

    def callback(epoch: int, record: Mapping[str, float]) -> None:
        seen.append((epoch, record["loss"], torch.load(path, weights_only=True)["epoch"]))

    _, history = train(checkpoint=Checkpoint(path, "f"), callbacks=[callback])
    assert [(e, loss) for e, loss, _ in seen] == [(h["epoch"], h["loss"]) for h in history] and len(seen) == 3
    assert [saved for *_, saved in seen] == [0, 1, 2]  # the epoch just finished is already resumable


def test_epoch_statistics_measure_the_spread_of_embeddings() -> None:
    _, history = train()
    assert all(0 < h["spread"] <= h["healthy"] for h in history) and history[0]["healthy"] == pytest.approx(5**-0.5)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    full, full_history = train(accumulate=2)

    def interrupt(epoch: int, _record: object) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", "settings-1")
    with pytest.raises(KeyboardInterrupt):
        train(accumulate=2, checkpoint=checkpoint, callbacks=[interrupt])
    resumed, history = train(accumulate=2, checkpoint=checkpoint)
    assert len(resumed.lrs) == 2  # only the last epoch's steps ran
    for a, b in zip(weights(full), weights(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["loss"] for h in history] == [h["loss"] for h in full_history]
    # Another fingerprint: the checkpoint is not resumed, and the log says why.
    with caplog.at_level(logging.WARNING, logger="cass"):
        other, _ = train(accumulate=2, checkpoint=Checkpoint(checkpoint.path, "settings-2"))
    assert len(other.lrs) == 6 and "made with other settings or data" in caplog.text
    # resume=False (--no-resume) starts over too.
    assert len(train(accumulate=2, checkpoint=Checkpoint(checkpoint.path, "settings-2", resume=False))[0].lrs) == 6


def test_a_checkpoint_this_version_cannot_load_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"fingerprint": "f", "epoch": 0, "history": [], "weights": {}}, path)  # no model/optimizer
    with pytest.raises(TrainingError, match="cannot resume this checkpoint .*KeyError.*; delete it or rerun"):
        train(checkpoint=Checkpoint(path, "f", restart_hint="delete it or rerun with --no-resume"))


def test_early_stopping_ends_training_and_stays_stopped_after_resume(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", "f")
    learner, history = train(epochs=5, stop_after=2, checkpoint=checkpoint)
    assert len(history) == 2 and learner.epochs_ended == 2
    again, history = train(epochs=5, stop_after=2, checkpoint=checkpoint)
    assert len(history) == 2 and again.lrs == []  # a finished run is not continued


def test_a_checkpoint_not_kept_is_removed_once_the_outputs_are_written(tmp_path: Path) -> None:
    cfg = TrainerConfig(epochs=1, batch_size=8, device="cpu", num_workers=0)
    engine = Engine(cfg, seed=0, key="toy", progress=False)
    learner = Toy(engine)
    engine.data(Points(), full_batches=True)
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", "f", keep=False)
    engine.fit(learner, checkpoint)
    assert checkpoint.path.is_file()
    written: list[bool] = []
    engine.finish(lambda: written.append(checkpoint.path.is_file()), checkpoint)
    assert written == [True] and not checkpoint.path.exists()


def test_without_a_terminal_a_long_epoch_logs_progress_with_eta(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import cass.engine

    monkeypatch.setattr(cass.engine, "PROGRESS_EVERY_S", 0.0)  # every epoch counts as long
    cfg = TrainerConfig(epochs=2, batch_size=4, lr=0.1, device="cpu", num_workers=0)
    engine = Engine(cfg, seed=3, key="toy", progress=True)  # pytest captures stderr: no terminal, no bar
    learner = Toy(engine)
    engine.data(Points(), full_batches=False)  # 8 batches an epoch
    with caplog.at_level(logging.INFO, logger="cass"):
        engine.fit(learner)
    lines = [r.getMessage() for r in caplog.records if r.name == "cass.engine"]
    # One line per tenth of the epoch, the last batch left to the epoch's own line.
    assert [line.split(":")[0] + ":" + line.split(":")[1].split(",")[0] for line in lines] == [
        f"toy epoch {e}/2: batch {b}/8 ({b * 100 // 8}%)" for e in (1, 2) for b in range(1, 8)]
    assert all(" elapsed, ETA " in line and " for the epoch, " in line and line.endswith("for the stage")
               for line in lines), lines
    # A bar that shows (or progress turned off) means no lines; neither do short epochs at the default pace.
    caplog.clear()
    monkeypatch.setattr(cass.engine, "PROGRESS_EVERY_S", 30.0)
    with caplog.at_level(logging.INFO, logger="cass"):
        train(epochs=1)
    assert not [r for r in caplog.records if r.name == "cass.engine"]


def test_durations_read_as_a_person_would_say_them() -> None:
    from cass.engine import duration

    assert [duration(s) for s in (4.4, 65, 3599, 3725)] == ["4s", "1m05s", "59m59s", "1h02m"]


def test_the_epoch_loss_sums_stay_on_the_device_with_the_arithmetic_of_python_floats() -> None:
    """The engine adds each step's losses on the device (no host synchronisation per step); the epoch's mean
    must be what summing ``loss.item() * images`` in Python gives, bit for bit, batch sizes varying."""
    from cass.engine import EpochMeter

    g = torch.Generator().manual_seed(1)
    meter = EpochMeter(torch.device("cpu"))
    expected, images = 0.0, 0
    for n in (16, 16, 7, 16, 3):
        loss = torch.rand((), generator=g) * 4  # float32, like a training loss
        meter.add(n, StepOutput({"loss": loss}))
        expected += loss.item() * n
        images += n
    assert isinstance(meter.sums["loss"], torch.Tensor)
    assert meter.reduce() == (images, {"loss": expected / images})
