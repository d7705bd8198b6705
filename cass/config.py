"""Typed, validated, frozen settings loaded from ``params.yaml``.

``params.yaml`` is the single source of settings. Every stage receives a :class:`Params` object (or
one of its sections) explicitly; nothing reads the file behind the caller's back. Command-line
overrides (``--set pretrain.epochs=3``) are applied to the raw mapping and then validated by the same
schema, so a typo on the command line is rejected exactly like a typo in the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cass.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvLayout(_Section):
    """A CSV of image ids with one-hot label columns (the ISIC 2019 ground-truth format)."""

    file: str = Field(description="CSV file, relative to data.root")
    image_column: str = "image"
    label_columns: tuple[str, ...] | None = Field(
        default=None, description="one-hot label columns; default: every column but image/group"
    )
    image_dir: str = Field(default=".", description="folder of the images, relative to data.root")
    extension: str = Field(default=".jpg", description="appended to the image id to form the file name")
    multilabel: bool = False
    drop_columns: tuple[str, ...] = Field(
        default=(), description="label columns to ignore, e.g. ['UNK'] when no row uses it"
    )


class DataConfig(_Section):
    name: str = Field(default="demo", description="dataset name, used in tags and registered model descriptions")
    root: str = Field(default="data/demo", description="dataset directory (tracked by data.dvc)")
    layout: Literal["imagefolder", "csv", "medmnist"] = "imagefolder"
    csv: CsvLayout | None = None
    medmnist_file: str | None = Field(default=None, description=".npz file relative to data.root")
    group_column: str | None = Field(
        default=None, description="CSV column with a patient/group id; one group never spans two splits"
    )
    classes: tuple[str, ...] | None = Field(
        default=None, description="expected class set; default: the classes found in the data"
    )
    demo_images_per_class: int = Field(default=300, ge=8, description="size of the generated demo dataset")
    demo_image_size: int = Field(default=64, ge=16, le=512)
    max_image_pixels: int = Field(default=89_478_485, gt=0, description="decompression-bomb limit (Pillow's default)")
    workers: int = Field(default=0, ge=0, description="processes that hash/decode images; 0 = one per core")

    @model_validator(mode="after")
    def _layout_settings(self) -> DataConfig:
        if self.layout == "csv" and self.csv is None:
            raise ValueError("data.layout is 'csv' but data.csv is not set (file, image_column, ...)")
        if self.layout == "medmnist" and not self.medmnist_file:
            raise ValueError("data.layout is 'medmnist' but data.medmnist_file is not set")
        return self


class SplitConfig(_Section):
    val: float = Field(default=0.1, ge=0.0, lt=1.0, description="validation share when the data has no split")
    test: float = Field(default=0.2, gt=0.0, lt=1.0, description="test share when the data has no split")
    seed: int = 77
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("give at least one label fraction, e.g. [0.01, 0.1, 1.0]")
        for f in v:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"label fraction {f} is outside (0, 1]")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _shares(self) -> SplitConfig:
        if self.val + self.test >= 0.9:
            raise ValueError(f"split.val + split.test = {self.val + self.test:.2f} leaves under 10 % to train")
        return self


class AugmentConfig(_Section):
    """CASS augmentations; defaults are the paper's settings."""

    color_jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    color_jitter_p: float = Field(default=0.3, ge=0.0, le=1.0)
    perspective: float = Field(default=0.2, ge=0.0, le=1.0)
    perspective_p: float = Field(default=0.3, ge=0.0, le=1.0)
    affine_degrees: float = Field(default=10.0, ge=0.0, le=180.0)
    affine_p: float = Field(default=0.3, ge=0.0, le=1.0)
    hflip_p: float = Field(default=0.3, ge=0.0, le=1.0)
    vflip_p: float = Field(default=0.3, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class ModelConfig(_Section):
    cnn: str = Field(default="resnet50", description="timm name of the CNN")
    vit: str = Field(default="vit_base_patch16_384", description="timm name of the Vision Transformer")
    image_size: int = Field(default=384, ge=16, le=1024)
    embed_dim: int = Field(default=1000, ge=2, description="width of the shared CASS embedding head")
    pretrained: bool = Field(default=False, description="timm ImageNet weights (needs network access)")
    cnn_weights: str | None = Field(default=None, description="local path or s3:// URI of CNN weights")
    vit_weights: str | None = Field(default=None, description="local path or s3:// URI of ViT weights")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.pretrained and (self.cnn_weights or self.vit_weights):
            raise ValueError("model.pretrained and model.cnn_weights/vit_weights are exclusive; pick one source")
        return self


Precision = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adam", "adamw"]


class TrainerConfig(_Section):
    """Settings shared by the pretraining and the fine-tuning loops."""

    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    optimizer: Optimizer = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    min_lr: float = Field(default=1e-6, ge=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_epochs: int = Field(default=0, ge=0)
    accumulate: int = Field(default=1, ge=1, description="gradient accumulation steps per optimiser step")
    precision: Precision = Field(default="auto", description="auto = bf16 on CUDA where supported, else fp32")
    channels_last: bool = Field(default=True, description="channels_last memory format for the CNN on CUDA")
    compile: bool = False
    num_workers: int = Field(default=2, ge=0)
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")


class PretrainConfig(TrainerConfig):
    epochs: int = Field(default=100, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    pool: Literal["train", "train+val"] = Field(
        default="train", description="unlabelled images used for SSL (never the test split)"
    )
    collapse_warn_fraction: float = Field(
        default=0.2, gt=0.0, le=1.0, description="warn when embedding std < this x 1/sqrt(embed_dim)"
    )


ClassWeights = Literal["inverse_frequency", "authors", "none"]


class FinetuneConfig(TrainerConfig):
    networks: tuple[Literal["cnn", "vit"], ...] = ("cnn", "vit")
    init: Literal["cass", "random", "weights"] = Field(
        default="cass", description="cass = the pretraining checkpoint; weights = model.*_weights"
    )
    label_fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    epochs: int = Field(default=50, ge=1)
    lr: float = Field(default=3e-4, gt=0.0)
    patience: int = Field(default=5, ge=1, description="early stopping on validation loss")
    focal_gamma: float = Field(default=2.0, ge=0.0)
    focal_alpha: float = Field(default=1.0, gt=0.0)
    class_weights: ClassWeights = "inverse_frequency"
    freeze_epochs: int = Field(default=0, ge=0, description="epochs with a frozen backbone (head only)")
    augment_strength: float = Field(default=1.0, ge=0.0, le=2.0, description="scales augmentation p's")


class EvaluateConfig(_Section):
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="multi-label decision threshold")
    batch_size: int = Field(default=64, ge=1)


class MlflowConfig(_Section):
    """Tracking and registry. The demo uses a local SQLite store and artifact folder (no server);
    production points ``tracking_uri`` (or the MLFLOW_TRACKING_URI variable, which wins) at a server."""

    tracking_uri: str = Field(default="sqlite:///mlflow.db", description="overridden by MLFLOW_TRACKING_URI")
    artifact_location: str | None = Field(
        default="mlruns", description="artifact root for new experiments when the store is local"
    )
    experiment: str = "cass"
    model_prefix: str = Field(default="cass-demo", description="registered models are <prefix>-cnn, <prefix>-vit")


class Params(_Section):
    seed: int = 77
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _fraction_listed(self) -> Params:
        if self.finetune.label_fraction not in self.split.label_fractions:
            raise ValueError(
                f"finetune.label_fraction {self.finetune.label_fraction} is not one of split.label_fractions "
                f"{list(self.split.label_fractions)}; add it there so its subset file is written"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Loading and overrides


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that ``loc`` points into."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        current = nxt
    return list(current.model_fields)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid settings"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - {key}: unknown key{hint} Allowed keys here: {', '.join(allowed)}")
        else:
            got = e.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {e['msg']}{got_txt}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (``3``, ``1e-3``, ``[cnn]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. pretrain.epochs=3")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    data: dict[str, Any] = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
                node[p] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def params_from_mapping(raw: Mapping[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, pretrain:, ...)")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> Params:
    """Load ``params.yaml``, apply ``section.key=value`` overrides, validate."""
    overrides = list(overrides)
    raw = apply_overrides(read_params_file(path), overrides)
    source = f"{path}" + (f" with overrides {overrides}" if overrides else "")
    return params_from_mapping(raw, source)


def params_to_flat_dict(params: Params) -> dict[str, Any]:
    """Flat ``section.key`` -> value mapping (MLflow params, DVC-like views)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}.{name}" if prefix else name, getattr(value, name))
        else:
            flat[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", params)
    return flat
