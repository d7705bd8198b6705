"""A torch Dataset over manifest rows, and seeded DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cass.data.images import DEFAULT_MAX_PIXELS, load_rgb


class ImageDataset(Dataset):
    """Images from ``root``/``paths`` as 8-bit RGB through ``transform``, with optional targets.

    Targets are class indices (single-label, int64) or multi-hot float vectors (multi-label); without
    targets (self-supervised pretraining) the target is -1.
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
        self.seed: int | None = None

    def reseed(self, seed: int | None) -> None:
        """Seed the augmentations per image: image ``i`` gets the same random view for the same
        ``seed`` whichever process, worker or batch position loads it (``None``: torch's global RNG)."""
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = load_rgb(self.root / self.paths[i], self.max_pixels)
        if self.seed is None:
            image = self.transform(rgb)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, i))
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
) -> DataLoader:
    """A DataLoader whose order and augmentations depend only on ``seed`` (one seed per epoch); a
    ``sampler`` (e.g. this process's DistributedSampler shard) replaces ``shuffle``."""
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
        persistent_workers=False,
    )


def epoch_loader(
    dataset: ImageDataset,
    sampler: Sampler,
    epoch_seed: int,
    epoch: int,
    rank: int,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool = False,
) -> DataLoader:
    """Seed everything one training epoch depends on, then build its loader.

    Model randomness (dropout) follows ``epoch_seed + rank``, the sampler's order ``epoch``, each image's
    augmentation ``epoch_seed`` and its index, so an epoch is replayed exactly after a resume and gives
    every image the same view whatever the number of processes.
    """
    torch.manual_seed(epoch_seed + rank)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    dataset.reseed(epoch_seed)
    return make_loader(dataset, batch_size, shuffle=True, num_workers=num_workers, seed=epoch_seed,
                       drop_last=drop_last, pin_memory=pin_memory, sampler=sampler)
