"""Settings of training: the networks, the loop every trainer shares, pretraining (CASS and DINO) and
fine-tuning."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from cass.config_base import NETWORKS, Network, Section


class ModelConfig(Section):
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


class TrainerConfig(Section):
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
    sync_batchnorm: bool = Field(
        default=False, description="several CUDA processes: CNN BatchNorm statistics over the global batch"
    )
    num_workers: int | Literal["auto"] = Field(
        default="auto",
        description="DataLoader worker processes per training process; auto = none when training on the CPU "
        "(the model already uses every core), else one per spare core, at most 8",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("must be a number of worker processes (0 or more) or auto")


class DinoConfig(Section):
    """The DINO baseline (Caron et al. 2021); defaults are the official ones. Epochs, batch size, warm-up,
    min_lr, precision and workers come from ``pretrain``; the optimiser is always AdamW."""

    out_dim: int = Field(default=65536, ge=2, description="prototypes of the DINO head; reduce for small data")
    hidden_dim: int = Field(default=2048, ge=1)
    bottleneck_dim: int = Field(default=256, ge=1)
    head_layers: int = Field(default=3, ge=1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = Field(default=True, description="fix the weight-normalised last layer's norm at 1")
    local_crops: int = Field(default=8, ge=0, description="local crops per image (2 global crops always)")
    local_crop_size: int | None = Field(
        default=None, ge=8, description="default: image_size x 96/224, rounded to the ViT patch size"
    )
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    teacher_temp: float = Field(default=0.04, gt=0.0)
    warmup_teacher_temp: float = Field(default=0.04, gt=0.0)
    warmup_teacher_temp_epochs: int = Field(default=0, ge=0)
    student_temp: float = Field(default=0.1, gt=0.0)
    center_momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    momentum_teacher: float = Field(default=0.996, ge=0.0, le=1.0, description="EMA start; cosine to 1")
    lr: float | None = Field(default=None, gt=0.0, description="default: 5e-4 x batch_size x accumulate / 256")
    weight_decay: float = Field(default=0.04, ge=0.0)
    weight_decay_end: float = Field(default=0.4, ge=0.0)
    clip_grad: float = Field(default=3.0, ge=0.0, description="per-parameter gradient norm clip; 0 = off")
    freeze_last_layer_epochs: int = Field(default=1, ge=0)

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"crop scale {list(v)} must satisfy 0 < low <= high <= 1")
        return v


CassVariant = Literal["paper", "projector", "simsiam", "byol"]
"""The CASS recipes (cass.variants.VARIANTS says which parts each has); the one list of their names."""
VARIANT_NAMES: tuple[str, ...] = get_args(CassVariant)


class CassConfig(Section):
    """The parts of the CASS variants beyond the paper (``pretrain.variant``, see cass.variants); each part
    is used only by the variants that have it, and the paper recipe uses none."""

    views: int | None = Field(
        default=None, ge=1, le=2,
        description="views per image: 1 = one view through both networks, 2 = each network its own view; "
        "default: 1 for paper, 2 for the others",
    )
    projector_dim: int | None = Field(default=None, ge=2, description="projection width; default: model.embed_dim")
    projector_hidden_dim: int = Field(default=512, ge=1)
    predictor_hidden_dim: int = Field(default=128, ge=1)
    ema_momentum: float = Field(default=0.99, ge=0.0, le=1.0, description="byol: EMA target momentum, cosine to 1")


class PretrainConfig(TrainerConfig):
    method: Literal["cass", "dino"] = Field(default="cass", description="cass, or the DINO baseline (pretrain.dino)")
    variant: Literal[CassVariant, "auto"] = Field(
        default="paper",
        description="CASS recipe: paper (unchanged), projector, simsiam, byol (cass.variants); auto = the "
        "measured choice, the paper's recipe until a variant meets the rule of docs/baselines.md",
    )
    cass: CassConfig = CassConfig()
    monitor_every: int = Field(
        default=0, ge=0, description="kNN accuracy of each network's embeddings every N epochs; 0 = off"
    )
    monitor_k: int = Field(default=20, ge=1, description="neighbours of the kNN monitor")
    monitor_label_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="labelled training subset the kNN monitor fits on; default: finetune.label_fraction",
    )
    epochs: int = Field(default=100, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    pool: Literal["train", "train+val"] = Field(
        default="train", description="unlabelled images used for SSL (never the test split)"
    )
    collapse_warn_fraction: float = Field(
        default=0.2, gt=0.0, le=1.0, description="warn when embedding std < this x 1/sqrt(embed_dim)"
    )
    anti_collapse: Literal["none", "vicreg"] = Field(
        default="none", description="CASS only, beyond the paper: vicreg adds a variance-covariance term per network"
    )
    anti_collapse_weight: float = Field(default=1.0, gt=0.0, description="weight of the anti-collapse term")
    dino: DinoConfig = DinoConfig()


ClassWeights = Literal["inverse_frequency", "authors", "none"]


class FinetuneConfig(TrainerConfig):
    networks: tuple[Network, ...] = NETWORKS
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
