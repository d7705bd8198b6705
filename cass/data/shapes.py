"""A second generated dataset, unlike the tissue demo in kind: grayscale radiology-like images whose four
classes differ by the shape of one lesion, not by colour or texture.

Each image is an 8-bit grayscale ("L") slice: a body outline over a dark field, soft anatomy (broad
blobs, curved rib-like bands), one lesion and often a small distractor (a vessel in cross-section), then
blur, noise and exposure changes. The lesion's class is its shape:

- ``round``: a smooth round or slightly oval nodule;
- ``spiculated``: an irregular mass with spikes radiating from it;
- ``ring``: a bright rim around a darker core (a ring-enhancing lesion);
- ``elongated``: a thin, long, gently bent structure.

Contrast, size, position and orientation are drawn from the same ranges for every class, so neither the
lesion's brightness nor its place gives the class away. Generation is deterministic (one seed per image).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

CLASSES = ("elongated", "ring", "round", "spiculated")


def _rng(class_name: str, index: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"shapes:{seed}:{class_name}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-d array (numpy only)."""
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, radius, mode="reflect")
    rows = sum(w * pad[i : i + img.shape[0], :] for i, w in enumerate(k))
    return sum(w * rows[:, i : i + img.shape[1]] for i, w in enumerate(k))


def _anatomy(rng: np.random.Generator, size: int) -> np.ndarray:
    """Body outline, soft tissue blobs and rib-like bands, in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    cy, cx = 0.5 + rng.normal(0, 0.03, 2)
    ry, rx = rng.uniform(0.42, 0.52, 2)
    body = np.clip((1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2) * 8.0, 0.0, 1.0)
    img = 0.05 + 0.30 * body
    for _ in range(int(rng.integers(3, 7))):
        by, bx = rng.uniform(0.15, 0.85, 2)
        img += rng.uniform(-0.06, 0.08) * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * rng.uniform(0.08, 0.2) ** 2))
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    bands = np.sin(2 * np.pi * (u + 0.15 * (v - 0.5) ** 2) * rng.uniform(3.0, 5.0) + rng.uniform(0, 6.3))
    img += rng.uniform(0.03, 0.08) * np.clip(bands, 0.0, 1.0) ** 4 * body
    return img * body + 0.03 * (1 - body)


def _lesion(class_name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The class-defining structure as a mask in [0, 1] (its brightness is set by the caller)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    r = rng.uniform(0.09, 0.16) * size
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    edge = max(0.6, size / 64)  # soft edge width in pixels
    if class_name == "round":
        aspect = rng.uniform(1.0, 1.35)
        d = np.hypot(u / aspect, v * np.sqrt(aspect)) / r
        return np.clip((1.0 - d) * r / edge, 0.0, 1.0)
    if class_name == "ring":
        aspect = rng.uniform(1.0, 1.3)
        d = np.hypot(u / aspect, v * np.sqrt(aspect)) * 1.15 / r
        thickness = rng.uniform(0.22, 0.35)
        rim = np.clip((thickness - np.abs(d - (1 - thickness))) * r / edge, 0.0, 1.0)
        core = np.clip((1 - thickness - d) * r / edge, 0.0, 1.0)
        return np.clip(rim + rng.uniform(0.1, 0.3) * core, 0.0, 1.0)
    if class_name == "spiculated":
        phi = np.arctan2(v, u)
        spikes = int(rng.integers(6, 12))
        phases = rng.uniform(0, 2 * np.pi)
        lengths = np.abs(np.sin(spikes * phi / 2 + phases)) ** 8 * rng.uniform(0.6, 1.0)
        wobble = 1 + 0.15 * np.sin(3 * phi + rng.uniform(0, 6.3))
        reach = 0.7 * r * wobble * (1 + 0.9 * lengths)
        return np.clip((reach - np.hypot(u, v)) / edge, 0.0, 1.0)
    if class_name == "elongated":
        length = rng.uniform(1.6, 2.4) * r
        bend = rng.uniform(-0.5, 0.5) / r
        width = rng.uniform(0.18, 0.3) * r
        along = np.clip(u, -length, length)
        off = v - bend * along**2
        d = np.hypot(u - along, off)
        return np.clip((width - d) / edge, 0.0, 1.0)
    raise ValueError(f"unknown shape class {class_name!r}; known: {', '.join(CLASSES)}")


def render(class_name: str, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """One deterministic grayscale image of ``class_name``."""
    if class_name not in CLASSES:
        raise ValueError(f"unknown shape class {class_name!r}; known: {', '.join(CLASSES)}")
    rng = _rng(class_name, index, seed)
    img = _anatomy(rng, size)
    img += rng.uniform(0.18, 0.35) * _lesion(class_name, rng, size)
    if rng.random() < 0.6:  # a vessel in cross-section: a small round blob anywhere in the body
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        vy, vx = rng.uniform(0.2, 0.8, 2) * size
        vr = rng.uniform(0.025, 0.05) * size
        img += rng.uniform(0.1, 0.25) * np.clip(vr - np.hypot(yy - vy, xx - vx), 0.0, 1.0)
    img = _smooth(img, rng.uniform(0.4, 1.0) * size / 64)
    img = img + rng.normal(0.0, rng.uniform(0.015, 0.04), img.shape)  # quantum noise
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)  # window to the slice's own range
    img = np.clip(img ** rng.uniform(0.8, 1.25), 0.0, 1.0)  # display gamma
    return Image.fromarray((img * 255).astype(np.uint8), mode="L")
