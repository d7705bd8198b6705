"""The CASS augmentation pipeline and the evaluation transform.

Defaults are the paper's: resize, colour jitter 0.2 (p 0.3), random perspective 0.2 (p 0.3), random
affine 10 degrees (p 0.3), horizontal and vertical flips (p 0.3), ImageNet normalisation. Randomness
comes from torch's generator, which the training loops seed per epoch (and DataLoader per worker), so
a run can be replayed exactly.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cass.config import AugmentConfig


def _p(p: float, strength: float) -> float:
    return min(1.0, p * strength)


def cass_transform(image_size: int, aug: AugmentConfig, strength: float = 1.0) -> v2.Compose:
    """The training view. ``strength`` scales every probability (0 turns augmentation off)."""
    cj = aug.color_jitter
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomApply([v2.ColorJitter(cj, cj, cj, min(0.5, cj))], p=_p(aug.color_jitter_p, strength)),
        v2.RandomApply([v2.RandomPerspective(distortion_scale=aug.perspective, p=1.0)], p=_p(aug.perspective_p, strength)),
        v2.RandomApply([v2.RandomAffine(degrees=aug.affine_degrees)], p=_p(aug.affine_p, strength)),
        v2.RandomHorizontalFlip(p=_p(aug.hflip_p, strength)),
        v2.RandomVerticalFlip(p=_p(aug.vflip_p, strength)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
    ])


def eval_transform(image_size: int, aug: AugmentConfig) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
    ])
