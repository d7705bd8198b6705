"""A torch Dataset over manifest rows, and seeded DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cass.data.images import DEFAULT_MAX_PIXELS, load_rgb


class ImageDataset(Dataset):
    """Images from ``root``/``paths`` as 8-bit RGB through ``transform``, with optional targets.

    Targets are class indices (single-label, int64) or multi-hot float vectors (multi-label); without
    targets (self-supervised pretraining) the target is -1. ``dataset[i]`` draws the augmentation from
    torch's global RNG; ``dataset[(i, seed)]`` seeds it from ``seed`` and ``i``, so image ``i`` gets the same
    random view for the same ``seed`` whichever process, worker or batch position loads it.
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        transform: Callable,
        targets: np.ndarray | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform
        self.targets = targets
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        rgb = load_rgb(self.root / self.paths[i], self.max_pixels)
        if seed is None:
            image = self.transform(rgb)
        else:
            with torch.random.fork_rng(devices=[]):  # the transforms draw from the CPU generator only
                torch.default_generator.manual_seed(sample_seed(seed, i))
                image = self.transform(rgb)
        if self.targets is None:
            return image, torch.tensor(-1)
        return image, torch.as_tensor(self.targets[i])


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image ``index`` in the epoch seeded ``seed``."""
    return int(np.random.SeedSequence([seed % 2**63, index]).generate_state(1, np.uint64)[0] >> 1)


def encode_targets(labels: Sequence[Sequence[str]], classes: Sequence[str], multilabel: bool) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    if multilabel:
        out = np.zeros((len(labels), len(classes)), dtype=np.float32)
        for r, ls in enumerate(labels):
            out[r, [index[c] for c in ls]] = 1.0
        return out
    return np.asarray([index[ls[0]] for ls in labels], dtype=np.int64)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffled order depends only on ``seed``; a ``sampler`` (e.g. this process's
    DistributedSampler shard) replaces ``shuffle``. ``persistent_workers`` keeps the worker processes
    between passes over the data (training loops: see :class:`EpochLoader`, which also seeds the views)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


class SeededSampler(Sampler[tuple[int, int]]):
    """``sampler``'s indices paired with the epoch's augmentation seed: ``(index, seed)``.

    The seed travels with each index from the main process, so DataLoader workers that live across
    epochs (and keep the dataset object they started with) still augment each epoch with its own seed.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.seed = 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed = self.seed
        return ((int(i), seed) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class EpochLoader:
    """The training loader of every epoch of one loop, with its workers started once.

    ``for_epoch`` seeds everything the epoch depends on: model randomness (dropout) follows
    ``epoch_seed + rank``, the sampler's order ``epoch``, each image's augmentation ``epoch_seed`` and its
    index; so an epoch is replayed exactly after a resume and gives every image the same view whatever
    the number of processes or loader workers. The workers persist across epochs (no restart, no
    re-import, the next epoch's first batches prefetched as soon as it begins).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        sampler: Sampler[int],
        batch_size: int,
        num_workers: int,
        drop_last: bool,
        pin_memory: bool = False,
    ) -> None:
        self.sampler = SeededSampler(sampler)
        self.loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=0,
                                  drop_last=drop_last, pin_memory=pin_memory, sampler=self.sampler,
                                  persistent_workers=True)

    def for_epoch(self, epoch_seed: int, epoch: int, rank: int) -> DataLoader:
        torch.manual_seed(epoch_seed + rank)
        self.sampler.set_epoch(epoch, epoch_seed)
        return self.loader
