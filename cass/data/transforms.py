"""The CASS augmentation pipeline, the views of self-supervised pretraining, and the evaluation transform.

Defaults are the paper's: resize, colour jitter 0.2 (p 0.3), random perspective 0.2 (p 0.3), random
affine 10 degrees (p 0.3), horizontal and vertical flips (p 0.3), ImageNet normalisation. Randomness
comes from torch's generator, which the training loops seed per epoch (and DataLoader per worker), so
a run can be replayed exactly; an image's views are drawn one after the other from the generator its
dataset seeded for that image, so each view is reproducible and the two views differ.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
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
        v2.RandomApply(
            [v2.RandomPerspective(distortion_scale=aug.perspective, p=1.0)], p=_p(aug.perspective_p, strength)
        ),
        v2.RandomApply([v2.RandomAffine(degrees=aug.affine_degrees)], p=_p(aug.affine_p, strength)),
        v2.RandomHorizontalFlip(p=_p(aug.hflip_p, strength)),
        v2.RandomVerticalFlip(p=_p(aug.vflip_p, strength)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
    ])


def strong_view(image_size: int, aug: AugmentConfig) -> v2.Compose:
    """A harder self-supervised view (``augment.recipe: strong``): random resized crop, flips, colour jitter,
    grayscale and blur, the family of views SimCLR (Chen et al. 2020) and BYOL (Grill et al. 2020) found
    necessary for agreement between views to teach something.

    Kept within what medical images tolerate: hue moves at most 0.05 (stain colour carries meaning), crops
    keep at least ``augment.crop_scale[0]`` of the area, the blur's sigma (0.1-2.0 px at 224 px) scales with
    the image, and there is no solarisation.
    """
    cj = aug.strong_color_jitter
    sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
    kernel = 2 * max(1, round(3 * sigma[1])) + 1
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=aug.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(cj, cj, cj / 2, min(0.05, cj / 4))], p=aug.strong_color_jitter_p),
        v2.RandomGrayscale(p=aug.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=aug.blur_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
    ])


def pretrain_view(image_size: int, aug: AugmentConfig) -> v2.Compose:
    """One self-supervised view of ``augment.recipe``: the paper's (:func:`cass_transform`) or :func:`strong_view`."""
    if aug.recipe == "strong":
        return strong_view(image_size, aug)
    return cass_transform(image_size, aug)


class TwoViewTransform:
    """Two views of one image from the same random recipe, drawn one after the other: the first is the
    view a one-view transform would give for the same seed, the second a fresh draw.

    For the CASS variants where each network sees its own view (two views and a symmetric loss, as in
    SimSiam, Chen & He 2021, and BYOL, Grill et al. 2020). Returns a list, which the DataLoader batches
    into a list of two tensors.
    """

    def __init__(self, view: Callable) -> None:
        self.view = view

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.view(image), self.view(image)]


def pretrain_transform(image_size: int, aug: AugmentConfig, views: int) -> Callable:
    """What pretraining loads per image: one view (a tensor; the paper) or two (a list of two tensors)."""
    if views not in (1, 2):
        raise ValueError(f"pretrain.cass.views must be 1 or 2, got {views}")
    view = pretrain_view(image_size, aug)
    return view if views == 1 else TwoViewTransform(view)


def eval_transform(image_size: int, aug: AugmentConfig) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
    ])


class EvalBatchTransform:
    """:func:`eval_transform` split in two for batched inference: :meth:`image` turns one decoded image into
    8-bit pixels (cheap: a copy, nothing resized), :meth:`batch` resizes, scales and normalises a batch of
    them as tensors. Calling the object runs :func:`eval_transform` itself on one image.

    The same kernels run in the same order as in :func:`eval_transform` (the antialiased bilinear resize of
    8-bit pixels, then the scaling to [0, 1], then the normalisation), once per batch instead of once per
    image, so the batch equals the images transformed one by one (tests/test_predict.py checks it). The
    batch comes out channels-last (the pixels' own order in memory, as decoded), which a CPU's convolutions
    run faster on (:func:`cass.inference.load_folder` puts the network in that format too), and the scaling
    and normalisation run in place: values are unchanged, only memory and copies are saved.
    """

    def __init__(self, image_size: int, aug: AugmentConfig) -> None:
        self.size = (image_size, image_size)
        self.mean = torch.tensor(aug.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(aug.std, dtype=torch.float32).view(-1, 1, 1)
        self.one = eval_transform(image_size, aug)

    def __call__(self, image) -> torch.Tensor:
        return self.one(image)

    @staticmethod
    def image(image) -> torch.Tensor:
        """An RGB Pillow image as an (H, W, 3) uint8 tensor (its pixels as decoded, copied)."""
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, 3, size, size) float32, channels-last, from a list of :meth:`image` outputs of any sizes, in their
        order."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(images):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        out = None if len(by_shape) == 1 else torch.empty((len(images), *self.size, 3), dtype=torch.uint8)
        for shape, where in by_shape.items():
            group = torch.stack([images[i] for i in where])  # (n, H, W, 3)
            if shape[:2] != self.size:
                group = v2.functional.resize(group.permute(0, 3, 1, 2), list(self.size), antialias=True)
                group = group.permute(0, 2, 3, 1)
            if out is None:
                out = group
            else:
                out[where] = group
        # eval_transform's ToDtype(scale=True) then Normalize, as in torchvision: to float, times 1/255, minus the
        # mean, over the std
        x = out.permute(0, 3, 1, 2).to(torch.float32).mul_(1.0 / 255)
        return x.sub_(self.mean).div_(self.std)


class MultiCropTransform:
    """DINO's multi-crop views (Caron et al. 2021): 2 global crops then ``local_crops`` local crops.

    Per crop: random resized crop (bicubic), horizontal flip, colour jitter 0.4/0.4/0.2/0.1 (p 0.8),
    grayscale (p 0.2), Gaussian blur (p 1.0 / 0.1 on the global crops, 0.5 on local ones) and solarisation
    (p 0.2, second global crop only), then normalisation. The blur's sigma range (0.1-2.0 px at 224 px)
    is scaled with the crop size so small images are not blurred out. Returns a list of tensors.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        local_crops: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        aug: AugmentConfig,
    ) -> None:
        self.local_crops = local_crops
        self.sizes = [global_size, global_size] + [local_size] * local_crops
        self.global_views = [
            self._view(global_size, global_scale, blur_p=1.0, solarize_p=0.0, aug=aug),
            self._view(global_size, global_scale, blur_p=0.1, solarize_p=0.2, aug=aug),
        ]
        self.local_view = self._view(local_size, local_scale, blur_p=0.5, solarize_p=0.0, aug=aug)

    @staticmethod
    def _view(
        size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, aug: AugmentConfig
    ) -> v2.Compose:
        sigma = (0.1 * size / 224, 2.0 * size / 224)
        kernel = 2 * max(1, round(3 * sigma[1])) + 1
        return v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
        ])

    def __call__(self, image) -> list[torch.Tensor]:
        return [view(image) for view in self.global_views] + [self.local_view(image) for _ in range(self.local_crops)]
