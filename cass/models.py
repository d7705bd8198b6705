"""Network factory over timm names, and weight loading from local files or S3.

Both CASS networks end in a linear head of the same width (``model.embed_dim``): that head's output
is the embedding the CASS loss compares. Fine-tuning replaces it with a classifier.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
from torch import nn

from cass.config import Network
from cass.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

def known_models() -> list[str]:
    import timm

    return timm.list_models()


def check_model_name(name: str, key: str = "model") -> None:
    known = known_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"{key}: unknown timm model '{name}'.{hint} Valid choices are timm's {len(known)} registered "
        "names; `cass models` lists them (e.g. resnet50, vit_base_patch16_384, test_resnet, test_vit)."
    )


def create_network(
    name: str,
    num_classes: int,
    role: Network,
    image_size: int | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    key: str = "model",
    dynamic_size: bool = False,
) -> nn.Module:
    """Build ``name`` with a ``num_classes``-wide head; ViTs are built for ``image_size`` inputs.

    ``dynamic_size`` lets a ViT also take other input sizes (multiples of its patch size) by resampling
    its position embedding, as DINO's local crops need; the state_dict is the same either way."""
    import timm

    check_model_name(name, key)
    kwargs: dict = {"num_classes": num_classes, "pretrained": pretrained}
    if role == "vit" and image_size is not None:
        kwargs["img_size"] = image_size
    if role == "vit" and dynamic_size:
        kwargs["dynamic_img_size"] = True
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}: timm model '{name}' cannot be built as the {role} ({exc})") from None
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise ConfigError(
                f"{key}: could not fetch ImageNet weights for '{name}' ({exc}). Offline, set "
                "model.pretrained: false and model.cnn_weights/vit_weights to a local file or s3:// URI."
            ) from None
        raise
    if weights:
        load_weights(model, weights, strict_backbone=True)
    return model


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file or a torch file (loaded with ``weights_only=True``)."""
    text = str(source)
    if text.startswith("s3://"):
        from cass.storage import download

        path = download(text)
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or pickled-object files
        raise ConfigError(f"{path}: not a readable state_dict ({type(exc).__name__}: {exc})") from None
    for nested in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a state_dict (a mapping of tensors), got {type(obj).__name__}")
    return obj


def load_weights(model: nn.Module, source: str | Path, strict_backbone: bool = True) -> None:
    """Load weights; head tensors whose shape differs (e.g. 1000-way ImageNet head) are skipped."""
    state = read_state_dict(source)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = _head_keys(model)
    backbone_missing = [k for k in missing if k not in head]
    if strict_backbone and (backbone_missing or unexpected):
        raise TrainingError(
            f"{source}: weights do not fit {type(model).__name__}: missing {backbone_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]} (is it the right architecture?)"
        )
    if skipped:
        log.info("%s: kept the model's own head for %s (shape differs)", source, skipped)


def _head_keys(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_classifier", None)
    if getter is None:
        return set()
    head = getter()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features before the head (timm's ``pre_logits``): what fine-tuning builds on."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def reset_head(model: nn.Module, num_classes: int) -> None:
    model.reset_classifier(num_classes)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())
