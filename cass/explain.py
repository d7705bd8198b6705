"""What does the network look at? Heat maps of the evidence for a class, drawn over the image.

- **CNN: Grad-CAM** (Selvaraju et al. 2017) on the last convolutional stage, the feature map that timm's
  ``forward_features`` returns: each channel is weighted by the mean gradient of the class logit over the
  map, the weighted sum is passed through ReLU and upsampled to the image.
- **ViT: Grad-CAM over the patch tokens** (the default, ``evaluate.vit_explainer: gradcam``) on the tokens
  entering the last block. The class token reads the patch tokens through that block's attention, so the
  gradient of the class logit reaches them there (at the output of the last block the patch tokens no
  longer feed the class token and their gradient is zero). Like the CNN's map it is class-specific, so the
  two networks' panels answer the same question. **Attention rollout** (Abnar & Zuidema 2020,
  ``rollout``) is available too: it multiplies the head-averaged attention of every block (plus the
  identity for the residual path) and reads the class token's row. It shows where information flows,
  whatever the class, which is why it is not the default. timm computes attention with the fused
  ``F.scaled_dot_product_attention`` and never materialises the attention matrix, so rollout recomputes
  it from each block's ``qkv`` projection (the same q, k, norms and scale as timm).

Heat maps are coarse: one cell per feature-map position (a 64-px image gives the test CNN 2 x 2 cells and
a 16-px-patch ViT 4 x 4). This module is written here rather than taken from ``grad-cam`` (pytorch-grad-cam):
that package needs OpenCV and ttach for what is about a hundred lines, and has no attention rollout.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cass.errors import CassError

log = logging.getLogger(__name__)

Method = Literal["gradcam", "rollout"]


class ExplainError(CassError):
    """A heat map cannot be computed for this network."""

    exit_code = 4


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    scaled = (flat - low) / (high - low).clamp_min(1e-12)
    return torch.where(high > low, scaled, torch.zeros_like(scaled)).view_as(maps)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return _normalise(up).detach().cpu().numpy()


def _targets(logits: torch.Tensor, target: Sequence[int] | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(dim=1)
    return torch.as_tensor(list(target), device=logits.device)


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed")


def _grid(model: nn.Module, tokens: int) -> tuple[int, int]:
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == tokens:
        return int(grid[0]), int(grid[1])
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ExplainError(f"cannot lay {tokens} patch tokens on a square grid")
    return side, side


def grad_cam(model: nn.Module, x: torch.Tensor, target: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, H, W) in [0, 1] for ``target`` (default: each image's predicted class), and the logits.

    CNN: on ``forward_features`` (the last stage). ViT: on the patch tokens entering the last block."""
    model.eval()
    x = x.detach().clone().requires_grad_(True)  # a graph to the activations even if the weights are frozen
    captured: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        if _is_vit(model):
            def keep_input(_module: nn.Module, args: tuple) -> None:
                captured["act"] = args[0]
                args[0].retain_grad()

            handle = model.blocks[-1].register_forward_pre_hook(keep_input)
            try:
                logits = model(x)
            finally:
                handle.remove()
        else:
            features = model.forward_features(x)
            if features.ndim != 4:
                raise ExplainError(f"{type(model).__name__}: expected a (N, C, H, W) feature map for Grad-CAM, "
                                   f"got shape {tuple(features.shape)}")
            features.retain_grad()
            captured["act"] = features
            logits = model.forward_head(features)
        chosen = _targets(logits, target)
        model.zero_grad(set_to_none=True)
        logits.gather(1, chosen[:, None]).sum().backward()
    act, grad = captured["act"].detach(), captured["act"].grad
    if grad is None:
        raise ExplainError(f"{type(model).__name__}: no gradient reached the explained activations")
    if act.ndim == 3:  # ViT tokens (N, T, D): drop the class/register tokens, lay the patches on their grid
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        act, grad = act[:, prefix:], grad[:, prefix:]
        weights = grad.mean(dim=1, keepdim=True)
        cam = F.relu((act * weights).sum(dim=-1))
        cam = cam.view(len(cam), *_grid(model, cam.shape[1]))
    else:
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((act * weights).sum(dim=1))
    model.zero_grad(set_to_none=True)
    return _upsample(cam, tuple(x.shape[-2:])), logits.detach()


def attention_maps(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The attention probabilities (N, heads, T, T) of every block, recomputed from each block's ``qkv``
    projection so they exist whether or not timm runs the fused kernel; and the logits."""
    if not _is_vit(model):
        raise ExplainError(f"{type(model).__name__} has no attention blocks; attention rollout is for ViTs")
    maps: list[torch.Tensor] = []
    handles = []

    def recompute(attn: nn.Module):
        def hook(_module: nn.Module, _args: tuple, qkv: torch.Tensor) -> None:
            n, t, _ = qkv.shape
            q, k, _v = qkv.reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach())

        return hook

    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
            raise ExplainError(f"{type(model).__name__}: block {type(block).__name__} is not timm's Attention; "
                               "use evaluate.vit_explainer: gradcam")
        handles.append(attn.qkv.register_forward_hook(recompute(attn)))
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return maps, logits


def attention_rollout(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Attention rollout maps (N, H, W) in [0, 1]: the class token's share of each patch, and the logits."""
    maps, logits = attention_maps(model, x)
    rollout = None
    for attn in maps:
        a = attn.mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    relevance = rollout[:, 0, prefix:]
    cam = relevance.view(len(relevance), *_grid(model, relevance.shape[1]))
    return _upsample(cam, tuple(x.shape[-2:])), logits


def heat_maps(
    model: nn.Module, network: str, x: torch.Tensor, vit_method: Method = "gradcam"
) -> tuple[np.ndarray, torch.Tensor]:
    """The heat maps this platform shows for ``network`` (cnn: Grad-CAM; vit: ``vit_method``) and the logits."""
    if network == "vit" and vit_method == "rollout":
        return attention_rollout(model, x)
    return grad_cam(model, x)


def method_name(network: str, vit_method: Method = "gradcam") -> str:
    if network == "vit":
        return "attention rollout" if vit_method == "rollout" else "Grad-CAM over patch tokens"
    return "Grad-CAM (last conv stage)"


# --------------------------------------------------------------------------------------------------
# Drawing


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) input back to the 8-bit RGB image the network saw."""
    m = torch.as_tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(3, 1, 1)
    return ((x.cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map in a perceptual colour map (high = yellow) blended over the RGB image."""
    from matplotlib import colormaps

    colours = colormaps["inferno"](np.clip(heat, 0, 1))[..., :3]
    return ((1 - alpha) * image / 255.0 + alpha * colours).clip(0, 1)


@dataclass(frozen=True)
class Explained:
    """One image, its heat map and what it is."""

    image: np.ndarray  # (H, W, 3) uint8, as the network saw it
    heat: np.ndarray  # (H, W) in [0, 1]
    predicted: str
    probability: float
    truth: str | None = None
    name: str = ""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_panel(items: Sequence[Explained], path: Path, title: str, per_row: int = 2) -> Path:
    """A grid of (image, overlay) pairs captioned with true and predicted label and the probability."""
    from cass.io import atomic_path

    if not items:
        raise ExplainError("no images to explain")
    plt = _plt()
    rows = -(-len(items) // per_row)
    cols = 2 * min(per_row, len(items))
    fig, axes = plt.subplots(rows, cols, figsize=(1.75 * cols, 1.95 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, item in enumerate(items):
        r, c = divmod(i, per_row)
        left, right = axes[r][2 * c], axes[r][2 * c + 1]
        left.imshow(item.image)
        right.imshow(overlay(item.image, item.heat))
        ok = item.truth is None or item.predicted in item.truth.split("|")
        left.set_title(f"true: {item.truth}" if item.truth is not None else item.name, fontsize=7)
        right.set_title(f"pred: {item.predicted} ({item.probability:.2f})", fontsize=7,
                        color="black" if ok else "#b00020")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    # A 256-colour palette keeps the noisy tissue textures readable at a third of the size (the card embeds it).
    with Image.open(buffer) as rendered:
        palette = rendered.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                   dither=Image.Dither.NONE)
    with atomic_path(Path(path)) as tmp:
        palette.save(tmp, format="PNG", optimize=True)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# `cass explain`


def explain_files(
    model_uri: str, paths: Sequence[Path], out_dir: Path, vit_method: Method = "gradcam"
) -> list[Path]:
    """Heat-map overlays of image files from a logged model (``models:/<name>@champion``, ``runs:/...``) or a
    fine-tuning folder; one ``<image name>.<network>.png`` per image in ``out_dir``."""
    from cass.calibration import probabilities
    from cass.config import AugmentConfig
    from cass.data.images import DEFAULT_MAX_PIXELS, decode_image, read_bytes, to_rgb8
    from cass.data.transforms import eval_transform
    from cass.errors import DataError

    model, spec = _load(model_uri)
    transform = eval_transform(spec.image_size, AugmentConfig(mean=spec.mean, std=spec.std))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, paths):
        try:
            image = to_rgb8(decode_image(read_bytes(path), str(path), DEFAULT_MAX_PIXELS, spec.dicom_settings()))
        except DataError as exc:
            raise DataError(f"{path}: cannot explain it: {exc}") from None
        x = transform(image)[None]
        heat, logits = heat_maps(model, spec.network, x, vit_method)
        probs = probabilities(logits.numpy(), spec.multilabel, spec.temperature)[0]
        best = int(probs.argmax())
        item = Explained(to_display(x[0], spec.mean, spec.std), heat[0], spec.classes[best], float(probs[best]),
                         name=path.name)
        target = out_dir / f"{path.stem}.{spec.network}.png"
        written.append(save_panel([item], target, f"{spec.network}: {method_name(spec.network, vit_method)}", 1))
    return written


def _load(model_uri: str):
    """The torch network and its spec, from a fine-tuning folder or an MLflow model of :mod:`cass.serving`."""
    from cass.classifier import load_classifier
    from cass.outputs import FinetuneOutputs

    local = Path(model_uri)
    if FinetuneOutputs(local).spec.is_file():
        return load_classifier(local, "cpu")
    from cass.serving import load_verified

    wrapper = load_verified(model_uri).unwrap_python_model()  # hashes checked first (ModelIntegrityError)
    if not hasattr(wrapper, "model") or not hasattr(wrapper, "spec"):
        raise ExplainError(f"{model_uri} is not a CASS classifier (cass.serving.ImageClassifier)")
    return wrapper.model, wrapper.spec
