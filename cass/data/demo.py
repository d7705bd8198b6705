"""The embedded demo datasets: synthetic H&E-like tissue patches in four classes (``kind="tissue"``, the
default), or grayscale radiology-like lesions that differ by shape (``kind="shapes"``, cass.data.shapes).

Each class has its own texture, the way tissue types differ under the microscope: ``adipose`` (large
pale polygonal cells with thin membranes), ``lymphocytes`` (dense small dark round nuclei),
``stroma`` (wavy pink fibres) and ``tumor`` (large irregular crowded nuclei). Stain colour, scale,
orientation and noise vary per image, so a network has to learn texture and shape, not one colour.
Generation is deterministic (one seed per image) and takes a few seconds for the default size.
``metadata.csv`` records two acquisition facts of each image as subgroups: ``focus`` (sharp or blurred,
an out-of-focus scan) and ``patch`` (pure, or mixed where another tissue covers part of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cass.data import shapes
from cass.io import atomic_write_text

CLASSES = ("adipose", "lymphocytes", "stroma", "tumor")
_MARKER = ".cass-demo"
METADATA_FILE = "metadata.csv"

Painter = Callable[[np.random.Generator, int], np.ndarray]


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (numpy only)."""
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(w * pad[i : i + img.shape[0], :, :] for i, w in enumerate(k))
    return sum(w * rows[:, i : i + img.shape[1], :] for i, w in enumerate(k))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _stain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background (eosin-pink), nucleus (haematoxylin-purple) and membrane colours with jitter."""
    jitter = rng.normal(0.0, 0.04, size=3)
    background = np.array([0.93, 0.80, 0.86]) + jitter
    nucleus = np.array([0.35, 0.22, 0.55]) + rng.normal(0.0, 0.05, size=3)
    fibre = np.array([0.86, 0.52, 0.66]) + rng.normal(0.0, 0.04, size=3)
    return background, nucleus, fibre


def _blobs(size: int, rng: np.random.Generator, count: int, r_lo: float, r_hi: float, irregular: float) -> np.ndarray:
    """Soft mask of ``count`` (irregular) discs."""
    yy, xx = _grid(size)
    mask = np.zeros((size, size), dtype=np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(r_lo, r_hi)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + irregular * (np.sin(3 * angle + rng.uniform(0, 6.28)) * rng.uniform(0.3, 1.0))
        d = np.hypot(yy - cy, xx - cx) / (r * wobble)
        mask = np.maximum(mask, np.clip(1.5 - d, 0.0, 1.0))
    return mask


def _paint_adipose(rng: np.random.Generator, size: int) -> np.ndarray:
    bg, _nucleus, fibre = _stain(rng)
    k = int(rng.integers(5, 10))
    seeds = rng.uniform(0, size, size=(k, 2))
    yy, xx = _grid(size)
    d = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
    d.sort(axis=-1)
    membrane = np.clip(1.0 - (d[..., 1] - d[..., 0]) / rng.uniform(1.2, 2.2), 0.0, 1.0)
    img = np.ones((size, size, 3)) * (0.5 * bg + 0.5)  # nearly white fat vacuoles
    img = img * (1 - membrane[..., None]) + fibre * membrane[..., None]
    img = img * (1 - 0.8 * _blobs(size, rng, int(rng.integers(1, 4)), 1.2, 2.0, 0.2)[..., None]) + 0.0
    return img


def _paint_lymphocytes(rng: np.random.Generator, size: int) -> np.ndarray:
    bg, nucleus, _ = _stain(rng)
    mask = _blobs(size, rng, int(rng.integers(45, 75) * (size / 64) ** 2), 1.6, 2.6, 0.05)
    img = np.ones((size, size, 3)) * bg
    return img * (1 - mask[..., None]) + (nucleus * 0.7) * mask[..., None]


def _paint_stroma(rng: np.random.Generator, size: int) -> np.ndarray:
    bg, nucleus, fibre = _stain(rng)
    yy, xx = _grid(size)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(4.0, 7.0)
    wave = np.sin(2 * np.pi * (v + 2.5 * np.sin(u / rng.uniform(6, 12))) / period)
    fibres = np.clip(wave, 0, 1) ** 2
    img = np.ones((size, size, 3)) * bg
    img = img * (1 - fibres[..., None]) + fibre * fibres[..., None]
    spindles = _blobs(size, rng, int(rng.integers(2, 6)), 1.0, 1.8, 0.6)
    return img * (1 - spindles[..., None]) + nucleus * spindles[..., None]


def _paint_tumor(rng: np.random.Generator, size: int) -> np.ndarray:
    bg, nucleus, _ = _stain(rng)
    mask = _blobs(size, rng, int(rng.integers(12, 22) * (size / 64) ** 2), 3.5, 6.5, 0.45)
    chromatin = rng.uniform(0.75, 1.0, size=(size, size))
    img = np.ones((size, size, 3)) * (bg * 0.92)
    return img * (1 - mask[..., None]) + (nucleus * chromatin[..., None]) * mask[..., None]


PAINTERS: dict[str, Painter] = {
    "adipose": _paint_adipose,
    "lymphocytes": _paint_lymphocytes,
    "stroma": _paint_stroma,
    "tumor": _paint_tumor,
}


def render(class_name: str, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """One deterministic demo image."""
    return _render(class_name, index, size, seed)[0]


def _render(class_name: str, index: int, size: int, seed: int) -> tuple[Image.Image, dict[str, str]]:
    """One demo image and how it was made: ``focus`` (sharp / blurred) and ``patch`` (pure / mixed tissue),
    the subgroups the demo's ``metadata.csv`` records."""
    digest = hashlib.sha256(f"{seed}:{class_name}:{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    img = PAINTERS[class_name](rng, size)
    facts = {"focus": "sharp", "patch": "pure"}
    if rng.random() < 0.6:
        # Patches straddle tissue boundaries: part of the patch shows another tissue type.
        other = CLASSES[int(rng.integers(len(CLASSES)))]
        if other != class_name:
            facts["patch"] = "mixed"
            yy, xx = _grid(size)
            theta = rng.uniform(0, 2 * np.pi)
            edge = (xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)
            cut = size * rng.uniform(0.1, 0.35)  # the other tissue covers at most ~40 %
            region = np.clip((edge - cut) / 2.0, 0.0, 1.0)[..., None]
            img = img * (1 - region) + PAINTERS[other](rng, size) * region
    if rng.random() < 0.5:
        img = _blur(img, rng.uniform(0.5, 1.2))  # out-of-focus scan
        facts["focus"] = "blurred"
    img = img + rng.normal(0.0, 0.05, size=img.shape)  # sensor noise
    img = img * rng.uniform(0.9, 1.08)  # exposure
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255).astype(np.uint8), mode="RGB"), facts


DEMO_KINDS: dict[str, tuple[tuple[str, ...], Callable[[str, int, int, int], Image.Image]]] = {
    "tissue": (CLASSES, render),
    "shapes": (shapes.CLASSES, shapes.render),
}
"""Each generated dataset (``data.demo_kind``): its classes and the function drawing one image."""


def demo_classes(kind: str = "tissue") -> tuple[str, ...]:
    if kind not in DEMO_KINDS:
        raise ValueError(f"data.demo_kind: unknown generated dataset {kind!r}; choose one of {', '.join(DEMO_KINDS)}")
    return DEMO_KINDS[kind][0]


def generate_demo(
    root: Path,
    images_per_class: int = 300,
    size: int = 64,
    seed: int = 0,
    force: bool = False,
    kind: str = "tissue",
) -> Path:
    """Write a generated dataset as an ImageFolder tree under ``root``; a no-op if it is already there.

    ``kind`` picks the dataset (:data:`DEMO_KINDS`); class folders of another kind are emptied, so the
    folder holds one dataset. The tissue dataset also gets ``metadata.csv`` (path, focus, patch: the
    subgroups of each image, for ``data.group_columns``)."""
    classes = demo_classes(kind)
    paint = DEMO_KINDS[kind][1]
    marker = root / _MARKER
    stamp = f"classes={','.join(classes)} per_class={images_per_class} size={size} seed={seed}"
    # The tissue folders made before metadata.csv existed are written again (same images, plus the file).
    stamp = f"kind={kind} {stamp}\n" if kind != "tissue" else f"{stamp} metadata=1\n"
    if not force and marker.is_file() and marker.read_text() == stamp:
        return root
    stale_classes = {c for cs, _ in DEMO_KINDS.values() for c in cs} - set(classes)
    for cls in sorted(stale_classes):
        folder = root / cls
        if folder.is_dir():
            for stale in folder.glob("*.png"):
                stale.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    rows = ["path,focus,patch"]
    for cls in classes:
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):
            stale.unlink()
        for i in range(images_per_class):
            target = folder / f"{cls}_{i:04d}.png"
            if kind == "tissue":
                image, facts = _render(cls, i, size, seed)
                rows.append(f"{cls}/{target.name},{facts['focus']},{facts['patch']}")
            else:
                image = paint(cls, i, size, seed)
            image.save(target, optimize=False)
    if kind == "tissue":
        atomic_write_text(root / METADATA_FILE, "\n".join(rows) + "\n")
    else:
        (root / METADATA_FILE).unlink(missing_ok=True)  # the tissue subgroups do not describe these images
    atomic_write_text(marker, stamp)
    return root
