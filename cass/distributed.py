"""Data-parallel training across processes with PyTorch DistributedDataParallel, launched by torchrun.

Nothing here is home-made distribution: ``torchrun`` starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT; :func:`setup` joins the process group those variables describe (NCCL
on CUDA, gloo on CPU). Without those variables every helper is a no-op for a single process, so the
training loops have one code path.

The training loops keep the GLOBAL batch: each process takes ``batch_size / world_size`` images per
step, a DistributedSampler shards one seeded permutation per epoch, and DDP averages the gradients, so
N processes compute what one process would with the whole batch (to float rounding for networks
without BatchNorm, or with ``sync_batchnorm`` on CUDA). Only rank 0 logs progress and writes files;
checkpoints hold plain state_dicts, so they resume with any number of processes.

    torchrun --standalone --nproc_per_node 4 -m cass.cli pretrain     # or: cass pretrain --nproc 4
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from cass.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def setup(device: torch.device, timeout_s: float = 1800.0) -> Context:
    """Join the process group torchrun described (once per process) and pick this rank's device.

    On CUDA each process trains on ``cuda:LOCAL_RANK`` with NCCL; on CPU the backend is gloo.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return Context(0, 1, 0, device)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"device {device} names one GPU for {world} processes; set device: auto or cuda (each process "
                "then trains on cuda:LOCAL_RANK), and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not on {device}; set device")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        log.info("joined process group: rank %d of %d (%s) on %s", rank, world, backend, device)
    elif dist.get_world_size() != world:
        raise ConfigError(f"a process group of {dist.get_world_size()} is already running but WORLD_SIZE={world}")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_world_size() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without a process group)."""
    return _env_int("LOCAL_WORLD_SIZE", 1) if world_size() > 1 else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, shows progress and writes files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at exit of a torchrun-launched command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all processes, in place (metrics only; the loss never needs this)."""
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank, so decisions such as early stopping cannot diverge."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def local_batch_size(global_batch: int, key: str, world: int | None = None) -> int:
    """The per-process batch that keeps the global batch ``global_batch`` (``world``: this process group)."""
    world = world_size() if world is None else world
    if global_batch % world:
        raise ConfigError(
            f"{key} = {global_batch} is the global batch and must be divisible by the {world} processes; "
            f"set {key} to a multiple of {world} or start another number of processes"
        )
    return global_batch // world


def sampler(dataset: Dataset, *, shuffle: bool, seed: int, drop_last: bool) -> DistributedSampler:
    """This rank's shard of one permutation per epoch (call ``set_epoch``); with one process, the whole
    permutation, so the order of the images in the global batch does not depend on the world size."""
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def wrap(
    model: nn.Module, device: torch.device, *, sync_batchnorm: bool = False, key: str = "sync_batchnorm",
    find_unused_parameters: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """(plain model, model to call for training): DDP-wrapped when there are several processes.

    With ``sync_batchnorm`` BatchNorm layers are converted to SyncBatchNorm (same state_dict keys, so
    checkpoints stay interchangeable). The plain model is the one to save, validate and load into.
    """
    if world_size() == 1:
        return model, model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(f"{key}: SyncBatchNorm needs CUDA devices (none on {device}); set {key}: false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    return model, ddp


@contextlib.contextmanager
def no_sync(models: Sequence[nn.Module], enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-batches (it runs on the last one)."""
    with contextlib.ExitStack() as stack:
        if enabled:
            for m in models:
                if isinstance(m, nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc N`` (or an abbreviation): torchrun's own parser would take it for its
    ``--nproc-per-node``, and the workers must not launch again anyway."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and "--nproc".startswith(name):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``cass <argv>`` in ``nproc`` processes on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "cass.cli", *_without_nproc(argv),
    ]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Re-run ``cass <argv>`` under torchrun with ``nproc`` processes; returns torchrun's exit code."""
    import subprocess

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give a number of processes >= 1")
    cmd = torchrun_command(nproc, argv)
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)
