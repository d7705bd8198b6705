"""Typed, validated, frozen settings loaded from ``params.yaml``.

``params.yaml`` is the single source of settings. Every stage receives a :class:`Params` object (or
one of its sections) explicitly; nothing reads the file behind the caller's back. Command-line
overrides (``--set pretrain.epochs=3``) are applied to the raw mapping and then validated by the same
schema, so a typo on the command line is rejected exactly like a typo in the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cass.data.dicom_presets import DICOM_SUBGROUPS, WINDOW_PRESETS
from cass.data.layouts import get_layout
from cass.errors import ConfigError, did_you_mean

Network = Literal["cnn", "vit"]
"""The two networks CASS pretrains together: the CNN and the Vision Transformer."""
NETWORKS: tuple[Network, ...] = ("cnn", "vit")

AUTO = "auto"
"""A setting the dataset implies (model names from its name, gate metrics from its task), resolved by Params."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Section(BaseModel):
    # No setting can train with inf or nan (finetune.lr=.inf used to pass and fail at epoch 2).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CsvLayout(_Section):
    """A CSV of image ids with one-hot label columns (the ISIC 2019 ground-truth format)."""

    file: str = Field(description="CSV file, relative to data.root")
    image_column: str = "image"
    label_columns: tuple[str, ...] | None = Field(
        default=None, description="one-hot label columns; default: every column but image/group"
    )
    image_dir: str = Field(default=".", description="folder of the images, relative to data.root")
    extension: str = Field(
        default=AUTO,
        description="appended to the image id to form the file name; auto: nothing for ids that already end in "
        "an image extension (x.png), else .jpg (ISIC); '' for none",
    )
    multilabel: bool = False
    drop_columns: tuple[str, ...] = Field(
        default=(), description="label columns to ignore, e.g. ['UNK'] when no row uses it"
    )


class DicomConfig(_Section):
    """How DICOM pixels become the image a network sees (the ``dicom`` layout, and prediction on DICOM files)."""

    window: str = Field(
        default="file",
        description="VOI window: file (the file's own window centre/width, else min..max), minmax, manual "
        "(window_center/window_width), or a preset: " + ", ".join(WINDOW_PRESETS),
    )
    window_center: float | None = Field(default=None, description="window: manual; in rescaled units (HU for CT)")
    window_width: float | None = Field(default=None, gt=0.0, description="window: manual")
    frame: int | None = Field(
        default=None, ge=0,
        description="multi-frame files: the frame to use (0-based); null refuses multi-frame files with the reason",
    )
    labels_file: str | None = Field(
        default=None, description="CSV of labels, relative to data.root; null: labels from <root>/<class>/ folders"
    )
    labels_key: str = Field(
        default="path", description="what labels_file keys each image by: path (relative to data.root) or a DICOM "
        "attribute keyword (SOPInstanceUID, StudyInstanceUID, AccessionNumber, ...)",
    )
    labels_column: str = Field(default="label", description="the labels_file column holding the class name")
    expected_modalities: tuple[str, ...] = Field(
        default=(), description="modalities the data gate accepts (CT, MR, CR, DX...); empty: the most common one"
    )
    allowed_photometric: tuple[str, ...] = Field(
        default=("MONOCHROME1", "MONOCHROME2"),
        description="photometric interpretations the data gate accepts (add RGB, YBR_FULL... for colour data)",
    )

    @model_validator(mode="after")
    def _window(self) -> DicomConfig:
        known = ("file", "minmax", "manual", *WINDOW_PRESETS)
        if self.window not in known:
            raise ValueError(f"unknown window {self.window!r}{did_you_mean(self.window, known)} Known: "
                             f"{', '.join(known)}")
        if self.window == "manual" and (self.window_center is None or self.window_width is None):
            raise ValueError("data.dicom.window is manual: set data.dicom.window_center and data.dicom.window_width")
        return self


class DataConfig(_Section):
    name: str = Field(default="demo", description="dataset name, used in tags and registered model descriptions")
    root: str = Field(default="data/demo", description="dataset directory (tracked by data.dvc)")
    layout: str = Field(
        default="imagefolder",
        description="how the dataset is organised: a registered layout (cass.data.layouts.layout_names())",
    )
    csv: CsvLayout | None = None
    medmnist_file: str | None = Field(default=None, description=".npz file relative to data.root")
    group_column: str | None = Field(
        default=None, description="CSV column with a patient/group id; one group never spans two splits"
    )
    group_columns: tuple[str, ...] = Field(
        default=(), description="subgroup columns (site, scanner, sex, age band) for per-subgroup test metrics"
    )
    groups_file: str | None = Field(
        default=None,
        description="CSV relative to data.root holding the group columns and a key column; default: data.csv.file",
    )
    groups_key: str | None = Field(
        default=None,
        description="column of groups_file naming each image: its manifest path or its file name without "
        "extension; default: data.csv.image_column for the csv layout's file, else 'path'",
    )
    classes: tuple[str, ...] | None = Field(
        default=None, description="expected class set; default: the classes found in the data"
    )
    demo_images_per_class: int = Field(default=300, ge=8, description="size of the generated demo dataset")
    demo_image_size: int = Field(default=64, ge=16, le=512)
    demo_kind: Literal["tissue", "shapes"] = Field(
        default="tissue", description="generated dataset: tissue (H&E-like colour/texture) or shapes (grayscale, shape)"
    )
    max_image_pixels: int = Field(
        default=89_478_485, gt=0, description="decompression-bomb limit per image, checked before decoding"
    )
    workers: int = Field(default=0, ge=0, description="processes that hash/decode images; 0 = one per core")
    dicom: DicomConfig = Field(default_factory=DicomConfig, description="pixels and labels of DICOM files")

    @field_validator("layout")
    @classmethod
    def _known_layout(cls, v: str) -> str:
        get_layout(v)  # an unknown name: an error listing the registered layouts and the closest one
        return v

    @model_validator(mode="after")
    def _layout_settings(self) -> DataConfig:
        missing = get_layout(self.layout).missing_settings(self)
        if missing:
            raise ValueError(f"data.layout is '{self.layout}' but " + "; ".join(missing))
        if self.layout == "dicom" and not self.groups_file:
            unknown = [c for c in self.group_columns if c not in DICOM_SUBGROUPS]
            if unknown:
                raise ValueError(f"data.group_columns {unknown}: the dicom layout's subgroups are DICOM attributes, "
                                 f"one of {', '.join(DICOM_SUBGROUPS)} (or set data.groups_file)")
        elif self.group_columns and not self.groups_file and self.layout != "csv":
            raise ValueError(
                "data.group_columns needs data.groups_file: a CSV under data.root with a key column (data.groups_key, "
                "default 'path') and the group columns"
            )
        if len(set(self.group_columns)) != len(self.group_columns):
            raise ValueError(f"data.group_columns lists a column twice: {list(self.group_columns)}")
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
    recipe: Literal["paper", "strong"] = Field(
        default="paper",
        description="views of self-supervised pretraining: paper (the settings above) or strong (random resized "
        "crop, stronger colour jitter, grayscale, blur: the keys below); fine-tuning always uses the paper's",
    )
    crop_scale: tuple[float, float] = Field(default=(0.25, 1.0), description="strong: area share of the random crop")
    strong_color_jitter: float = Field(default=0.4, ge=0.0, le=1.0, description="strong: brightness/contrast jitter")
    strong_color_jitter_p: float = Field(default=0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(default=0.2, ge=0.0, le=1.0, description="strong: drop colour (stain) information")
    blur_p: float = Field(default=0.5, ge=0.0, le=1.0, description="strong: Gaussian blur (out-of-focus scan)")

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"crop scale {list(v)} must satisfy 0 < low <= high <= 1")
        return v


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


class DinoConfig(_Section):
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


CassVariant = Literal["paper", "projector", "simsiam", "byol", "auto"]


class CassConfig(_Section):
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
    variant: CassVariant = Field(
        default="paper",
        description="CASS recipe: paper (unchanged), projector, simsiam, byol (cass.variants); auto = the "
        "measured choice for the start (pretrained weights: paper)",
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


class EvaluateConfig(_Section):
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="multi-label decision threshold")
    batch_size: int = Field(default=64, ge=1)
    calibrate: bool = Field(
        default=True, description="fit a temperature on the validation split after fine-tuning; served and "
        "evaluated probabilities use it (cass.calibration)"
    )
    threshold_rule: Literal["fixed", "max_f1"] = Field(
        default="max_f1", description="multi-label: per-label thresholds maximising validation F1 (max_f1), or "
        "evaluate.threshold for every label (fixed)"
    )
    ece_bins: int = Field(default=15, ge=2, le=100, description="equal-width confidence bins of the ECE")
    explain_per_class: int = Field(
        default=2, ge=0, le=20, description="seeded test images per class in the explanation panel; 0 = none"
    )
    vit_explainer: Literal["gradcam", "rollout"] = Field(
        default="gradcam", description="ViT heat maps: Grad-CAM over the patch tokens or attention rollout"
    )
    min_subgroup_size: int = Field(
        default=10, ge=1, description="subgroups with fewer test images are listed but left out of the gap"
    )


class MlflowConfig(_Section):
    """Tracking and registry. The demo uses a local SQLite store and artifact folder (no server);
    production points ``tracking_uri`` (or the MLFLOW_TRACKING_URI variable, which wins) at a server."""

    tracking_uri: str = Field(default="sqlite:///mlflow.db", description="overridden by MLFLOW_TRACKING_URI")
    artifact_location: str | None = Field(
        default="mlruns", description="artifact root for new experiments when the store is local"
    )
    experiment: str = "cass"
    model_prefix: str = Field(
        default=AUTO,
        description="registered models are <prefix>-cnn, <prefix>-vit; auto: cass-<data.name>, so that models of "
        "different datasets are never versions of one registered model",
    )
    server_timeout_s: float = Field(
        default=5.0, gt=0.0, description="how long to wait for the tracking server before giving up (before training)"
    )
    artifact_retries: int = Field(default=3, ge=1, description="attempts per artifact/model upload")
    artifact_retry_delay_s: float = Field(default=2.0, ge=0.0, description="first retry delay; doubles each time")
    # MLflow's own HTTP client (MLFLOW_HTTP_REQUEST_*, which win when set): a call to a dead server gives up
    # after about (http_retries + 1) x http_timeout_s plus the back-off, instead of MLflow's ~4 minutes.
    http_timeout_s: int = Field(default=30, ge=1, description="seconds per HTTP request to the tracking server")
    http_retries: int = Field(default=3, ge=0, le=10, description="retries of a failed HTTP request")
    http_backoff_factor: int = Field(
        default=1, ge=0, le=120, description="retry back-off: factor x 2^(n-1) s before the n-th retry (n >= 2)"
    )
    open_runs_file: str = Field(
        default="mlflow-open-runs.json",
        description="runs left open when the tracking server stopped answering; closed at the next start",
    )
    promotion_metric: Literal["macro_f1", "balanced_accuracy", "accuracy", "macro_auroc"] = Field(
        default="macro_f1", description="test metric a candidate must improve to become champion"
    )
    promotion_margin: float = Field(
        default=0.01, gt=0.0, le=1.0, description="candidate - champion must be at least this on the same test set"
    )
    lock_timeout_s: float = Field(default=120.0, gt=0.0, description="wait this long for another promotion")
    lock_stale_s: float = Field(
        default=900.0, gt=0.0, description="a promotion lock older than this was left by a dead process; broken"
    )
    system_metrics_interval_s: float = Field(
        default=2.0, ge=0.0, description="training runs sample CPU, memory (and GPU) every this many seconds into "
        "system/* metrics; 0 = off. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins when set"
    )


Severity = Literal["warn", "fail"]

ALL_MODES = ("RGB", "RGBA", "L", "LA", "P", "I;16", "I;16B", "I;16L", "I", "F")
"""Pillow modes the loader converts to 8-bit RGB faithfully (cass.data.images.to_rgb8)."""

# Every check of the data and model gates (cass.quality) with its default severity. A failed "fail" check stops
# the pipeline; a failed "warn" check is reported and the run goes on. quality.severity overrides these.
QUALITY_CHECKS: dict[str, Severity] = {
    # manifest gate (before any training)
    "rows_present": "fail",
    "inside_root": "fail",
    "file_exists": "fail",
    "decodes": "fail",
    "file_unchanged": "fail",
    "width_in_bounds": "fail",
    "height_in_bounds": "fail",
    "mode_allowed": "fail",
    "has_label": "fail",
    "labels_known": "fail",
    "single_label": "fail",
    "hash_label_conflict": "fail",
    "min_images_per_class": "fail",
    "imbalance_warn": "warn",
    "imbalance_fail": "fail",
    # manifest gate, DICOM data (cass.quality.dicom_suite)
    "dicom_modality_expected": "fail",
    "dicom_photometric_allowed": "fail",
    "dicom_pixel_spacing_present": "warn",
    "dicom_pixel_spacing_consistent": "warn",
    "dicom_frame_size_consistent": "warn",
    "dicom_no_burned_in_annotation": "warn",
    # split gate (before fine-tuning)
    "split_known": "fail",
    "hash_one_split": "fail",
    "group_one_split": "fail",
    "class_in_every_split": "fail",
    "subset_in_train": "fail",
    # model gate (before registration and promotion)
    "metric_present": "fail",
    "metric_not_nan": "fail",
    "metric_in_range": "fail",
    "macro_f1_floor": "fail",
    "balanced_accuracy_floor": "fail",
    "class_recall_nonzero": "fail",
    "ece_ceiling": "fail",
    "subgroup_gap_ceiling": "fail",
}


SINGLE_LABEL_METRICS = ("macro_f1", "balanced_accuracy", "accuracy", "macro_auroc")
MULTI_LABEL_METRICS = ("macro_f1", "balanced_accuracy", "exact_match", "macro_auroc")
"""The metrics in [0, 1] that evaluation writes (cass.metrics), per task; the model gate may require any of them."""


def task_metrics(multilabel: bool | None) -> tuple[str, ...]:
    """What ``quality.expected_metrics: auto`` stands for: every metric evaluation writes for the task, or
    those it writes for both when the settings alone do not tell the task (MedMNIST)."""
    if multilabel is None:
        return tuple(m for m in SINGLE_LABEL_METRICS if m in MULTI_LABEL_METRICS)
    return MULTI_LABEL_METRICS if multilabel else SINGLE_LABEL_METRICS


def unwritten_metrics(metrics: Iterable[str], multilabel: bool | None) -> list[str]:
    """The metrics of ``metrics`` that evaluation does not write for this task (none known when it is unknown)."""
    if multilabel is None:
        return []
    written = task_metrics(multilabel)
    return [m for m in metrics if m not in written]


def metrics_fix(metrics: Iterable[str], multilabel: bool) -> str:
    """The sentence that says which metrics a task lacks and the value of quality.expected_metrics to set."""
    wrong = unwritten_metrics(metrics, multilabel)
    task = "multi-label" if multilabel else "single-label"
    return (
        f"quality.expected_metrics lists {wrong}, which evaluation of {task} data does not write, so the model "
        f"gate would fail after training; set quality.expected_metrics: auto (here {list(task_metrics(multilabel))})"
    )


class QualityConfig(_Section):
    """Thresholds and severities of the Great Expectations gates (``cass validate manifest|splits|model``)."""

    min_width: int = Field(default=16, ge=1, description="narrowest image accepted, in pixels")
    max_width: int = Field(default=16384, ge=1)
    min_height: int = Field(default=16, ge=1)
    max_height: int = Field(default=16384, ge=1)
    allowed_modes: tuple[str, ...] = Field(
        default=ALL_MODES,
        description="Pillow modes accepted (default: every mode the loader converts to 8-bit RGB faithfully)",
    )
    min_images_per_class: int = Field(default=5, ge=1, description="fewer images than this in a class fails")
    imbalance_warn_ratio: float = Field(default=10.0, ge=1.0, description="largest/smallest class count: warn above")
    imbalance_fail_ratio: float = Field(default=100.0, ge=1.0, description="largest/smallest class count: fail above")
    expected_metrics: tuple[str, ...] | Literal["auto"] = Field(
        default=AUTO,
        description="keys the evaluation metrics.json must hold, each a number in [0, 1]; auto: every metric "
        "evaluation writes for the data's task (accuracy for single-label, exact_match for multi-label data)",
    )
    min_macro_f1: float = Field(default=0.5, ge=0.0, le=1.0, description="test macro F1 floor")
    min_balanced_accuracy: float = Field(default=0.5, ge=0.0, le=1.0, description="test balanced accuracy floor")
    max_ece: float | None = Field(
        default=None, gt=0.0, le=1.0, description="ceiling on the test ECE after temperature scaling; null = none"
    )
    max_subgroup_gap: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="ceiling on the worst subgroup's shortfall (macro F1 or balanced accuracy) below the whole "
        "test split; needs data.group_columns; null = none",
    )
    severity: dict[str, Severity] = Field(
        default_factory=dict, description="check name -> warn | fail, overriding the defaults (QUALITY_CHECKS)"
    )
    max_examples: int = Field(default=5, ge=1, le=100, description="offending rows shown per failed check")
    model_gate_policy: Literal["per_network", "all"] = Field(
        default="per_network",
        description="per_network: each network that passes the model gate is registered and promoted on its own; "
        "all: nothing is registered unless every network passes",
    )

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, v: dict[str, Severity]) -> dict[str, Severity]:
        for name in v:
            if name not in QUALITY_CHECKS:
                raise ValueError(f"unknown check '{name}'{did_you_mean(name, QUALITY_CHECKS)} Known: "
                                 f"{', '.join(QUALITY_CHECKS)}")
        return v

    @field_validator("expected_metrics")
    @classmethod
    def _known_metrics(cls, v: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if v == AUTO:
            return v
        known = list(dict.fromkeys((*SINGLE_LABEL_METRICS, *MULTI_LABEL_METRICS)))
        for name in v:
            if name not in known:
                hint = did_you_mean(name, known)
                raise ValueError(f"unknown metric '{name}'{hint} Known: {', '.join(known)}, or auto")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> QualityConfig:
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("quality.min_width/min_height must not exceed max_width/max_height")
        if self.imbalance_warn_ratio > self.imbalance_fail_ratio:
            raise ValueError(
                f"quality.imbalance_warn_ratio {self.imbalance_warn_ratio} exceeds imbalance_fail_ratio "
                f"{self.imbalance_fail_ratio}; the warning level must come first"
            )
        return self

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, QUALITY_CHECKS[check])


class FloatSpec(_Section):
    """A float drawn from [low, high], on a log scale when ``log`` (learning rates, weight decay)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0.0, description="grid step; not with log")


class IntSpec(_Section):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(default=1, ge=1)


class CategoricalSpec(_Section):
    type: Literal["categorical"]
    choices: tuple[bool | int | float | str | None, ...]


SearchSpec = Annotated[FloatSpec | IntSpec | CategoricalSpec, Field(discriminator="type")]

TUNABLE_FINETUNE_KEYS = (
    "lr",
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "optimizer",
    "focal_gamma",
    "focal_alpha",
    "class_weights",
    "batch_size",
    "accumulate",
    "freeze_epochs",
    "augment_strength",
    "patience",
)
"""finetune.* keys a study may search. The rest choose what is trained (networks, init, label_fraction)
or where (device, workers): searching them would compare different experiments, not settings."""


def _default_space() -> dict[str, FloatSpec | IntSpec | CategoricalSpec]:
    return {
        "lr": FloatSpec(type="float", low=1e-5, high=1e-2, log=True),
        "weight_decay": FloatSpec(type="float", low=1e-6, high=1e-2, log=True),
        "focal_gamma": FloatSpec(type="float", low=0.0, high=3.0),
        "class_weights": CategoricalSpec(type="categorical", choices=("inverse_frequency", "authors", "none")),
        "batch_size": CategoricalSpec(type="categorical", choices=(8, 16, 32)),
        "freeze_epochs": IntSpec(type="int", low=0, high=2),
        "augment_strength": FloatSpec(type="float", low=0.5, high=1.5),
    }


def _check_search_param(name: str, spec: FloatSpec | IntSpec | CategoricalSpec) -> None:
    """Reject one entry of tune.space that no trial could use, naming it."""
    key = f"tune.space.{name}"
    fields = FinetuneConfig.model_fields
    if name not in fields:
        raise ValueError(
            f"{key}: '{name}' is not a finetune setting{did_you_mean(name, TUNABLE_FINETUNE_KEYS)} Tunable: "
            f"{', '.join(TUNABLE_FINETUNE_KEYS)}"
        )
    if name not in TUNABLE_FINETUNE_KEYS:
        raise ValueError(f"{key}: finetune.{name} cannot be tuned; tunable: {', '.join(TUNABLE_FINETUNE_KEYS)}")
    annotation = fields[name].annotation
    if isinstance(spec, CategoricalSpec):
        if not spec.choices:
            raise ValueError(f"{key}: the choice list is empty; give at least one value")
        values: tuple[Any, ...] = spec.choices
    else:
        if spec.low > spec.high:
            raise ValueError(f"{key}: low ({spec.low}) is greater than high ({spec.high})")
        if spec.log and spec.low <= 0:
            raise ValueError(f"{key}: a log scale needs low > 0 (got {spec.low})")
        fixed_grid = spec.step is not None if isinstance(spec, FloatSpec) else spec.step != 1
        if spec.log and fixed_grid:
            raise ValueError(f"{key}: use either log or step, not both")
        if annotation is int and isinstance(spec, FloatSpec):
            raise ValueError(f"{key}: finetune.{name} is a whole number; use type: int or categorical")
        if annotation not in (int, float):
            raise ValueError(f"{key}: finetune.{name} takes named values; use type: categorical with choices")
        values = (spec.low, spec.high)
    for value in values:
        try:
            FinetuneConfig.model_validate({name: value})
        except ValidationError as err:
            reason = "; ".join(e["msg"] for e in err.errors())
            raise ValueError(f"{key}: {value!r} is not a valid finetune.{name} ({reason})") from None


class PrunerConfig(_Section):
    """Stops a trial early when its per-epoch validation value trails the other trials at that epoch."""

    type: Literal["median", "percentile", "none"] = "median"
    n_startup_trials: int = Field(default=5, ge=0, description="finished trials before any pruning")
    n_warmup_steps: int = Field(default=1, ge=0, description="epochs of a trial that are never pruned")
    percentile: float = Field(default=50.0, gt=0.0, lt=100.0, description="percentile pruner: keep the top share")


class TuneConfig(_Section):
    """Optuna search over fine-tuning settings (``cass tune``). ``space`` maps finetune keys to ranges."""

    enabled: bool = Field(
        default=True, description="the pipeline tunes before fine-tuning (dvc.yaml, the flow); --tune-trials 0 or N "
        "overrides it for one run; `cass dvc-yaml` rewrites dvc.yaml after a change"
    )
    n_trials: int = Field(default=20, ge=1, description="finished trials the study aims at, over all workers")
    timeout: float | None = Field(default=None, gt=0.0, description="seconds after which a worker starts no trial")
    seed: int | None = Field(default=None, description="sampler seed; default: the top-level seed")
    objective: Literal["val_macro_f1", "val_balanced_accuracy", "val_loss"] = "val_macro_f1"
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None, description="default: minimize for val_loss, else maximize"
    )
    epochs: int | None = Field(default=None, ge=1, description="epochs per trial; default: finetune.epochs")
    startup_trials: int = Field(default=10, ge=0, description="random trials before TPE models the space")
    pruner: PrunerConfig = PrunerConfig()
    storage: str | None = Field(
        default=None, description="sqlite:///... or postgresql://...; default: <outputs>/tune/optuna_<net>.db"
    )
    study_name: str = Field(default="cass-finetune", min_length=1, description="one study per network: <name>-<net>")
    heartbeat_interval: int = Field(default=60, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(
        default=None, ge=1, description="silence after which a trial's worker counts as dead; default 2 x heartbeat"
    )
    max_retry: int = Field(default=3, ge=0, description="re-runs of a trial whose worker died")
    space: dict[str, SearchSpec] = Field(default_factory=_default_space)
    pin: tuple[str, ...] = Field(
        default=(), description="finetune keys that keep their value: not searched, not taken from --best-params"
    )

    @field_validator("pin", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("pin")
    @classmethod
    def _pinned_keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        keys = []
        for entry in v:
            name = entry.removeprefix("finetune.")
            if name not in TUNABLE_FINETUNE_KEYS:
                raise ValueError(
                    f"tune.pin: '{entry}' is not a tunable finetune setting"
                    f"{did_you_mean(name, TUNABLE_FINETUNE_KEYS) or '.'} Tunable (as finetune.<key>): "
                    f"{', '.join(TUNABLE_FINETUNE_KEYS)}"
                )
            keys.append(f"finetune.{name}")
        return tuple(dict.fromkeys(keys))

    @field_validator("space", mode="before")
    @classmethod
    def _typed(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            for name, spec in v.items():
                if isinstance(spec, Mapping) and spec.get("type") not in ("float", "int", "categorical"):
                    raise ValueError(
                        f"tune.space.{name}: set type: float, int or categorical (got {spec.get('type')!r}), "
                        "e.g. {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"
                    )
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, FloatSpec | IntSpec | CategoricalSpec]) -> dict:
        if not v:
            raise ValueError("tune.space is empty; give at least one finetune key to search, e.g. lr")
        for name, spec in v.items():
            _check_search_param(name, spec)
        return v

    @model_validator(mode="after")
    def _settings(self) -> TuneConfig:
        natural = "minimize" if self.objective == "val_loss" else "maximize"
        if self.direction is not None and self.direction != natural:
            raise ValueError(
                f"tune.direction '{self.direction}' does not fit tune.objective {self.objective}: "
                f"it should be {natural}d; leave tune.direction unset"
            )
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"tune.grace_period ({self.grace_period}) must exceed tune.heartbeat_interval "
                f"({self.heartbeat_interval}), or a live worker's trial is taken for dead"
            )
        return self

    @property
    def study_direction(self) -> Literal["maximize", "minimize"]:
        return self.direction or ("minimize" if self.objective == "val_loss" else "maximize")

    @property
    def pinned(self) -> frozenset[str]:
        """The ``finetune`` keys (without the section) that tuning leaves alone."""
        return frozenset(key.removeprefix("finetune.") for key in self.pin)

    @property
    def searched(self) -> dict[str, SearchSpec]:
        """``space`` without the pinned keys: what a trial draws."""
        return {name: spec for name, spec in self.space.items() if name not in self.pinned}


class NotifyConfig(_Section):
    """Who hears about a retraining run that failed or whose challenger was refused (flows/notify.py).

    The message goes to a Prefect notification block: a saved one (``block``: Slack, Teams, e-mail, any
    ``<type>/<name>`` from ``prefect block ls``) or, by default, a webhook whose URL (a secret: Slack's
    carries its token) comes from the environment, never from this file."""

    events: list[Literal["failed", "refused"]] = Field(
        default=["failed", "refused"], description="what notifies: a failed or crashed run, a refused challenger"
    )
    block: str | None = Field(
        default=None, description="a saved Prefect notification block, '<block-type-slug>/<name>'; "
        "null = the webhook of webhook_url_env"
    )
    webhook_url_env: str = Field(
        default="CASS_NOTIFY_WEBHOOK_URL",
        description="environment variable holding the webhook URL; unset = no notification",
    )
    webhook_token_env: str = Field(
        default="CASS_NOTIFY_WEBHOOK_TOKEN",
        description="environment variable holding a bearer token sent to the webhook, if the receiver wants one",
    )
    timeout_s: float = Field(default=10.0, gt=0.0, description="seconds the webhook may take to answer")


class RetrainConfig(_Section):
    """The Prefect retraining flow (``flows/retrain.py``): retries of its I/O tasks and its concurrency slot.

    Only I/O is retried (``dvc pull``, MLflow run creation, uploads, registration, promotion): a training
    step that failed for a real reason would fail again and waste GPU hours."""

    io_retries: int = Field(default=4, ge=0, description="retries of an I/O task after its first attempt")
    io_retry_delay_s: float = Field(default=10.0, ge=0.0, description="delay before the first retry; doubles")
    io_retry_max_delay_s: float = Field(default=300.0, ge=0.0, description="cap on one retry delay")
    concurrency_limit: str | None = Field(
        default="cass-retrain",
        description="Prefect global concurrency limit held by a retraining run (create it with limit 1); null = none",
    )
    parallel_finetune: Literal["auto", "always", "never"] = Field(
        default="auto", description="fine-tune the networks at the same time; auto = when finetune.device is CUDA"
    )
    notify: NotifyConfig = NotifyConfig()


DEFAULT_INTENDED_USE = (
    "Research use: classifying {dataset} images into {classes}, as decision support read by a qualified "
    "person. Not a medical device and not validated for diagnosis."
)
DEFAULT_LIMITATIONS = (
    "Measured on one held-out test split of one dataset ({dataset}, data version {data_version}). Performance "
    "on other sites, scanners, stains or patient populations is unknown until measured there. Probabilities are "
    "calibrated on the validation split of the same data; calibration can drift on new data. Heat maps show "
    "where the network's evidence lies, not why, and are coarse (one cell per feature-map position)."
)


class CardConfig(_Section):
    """The model card written for every registered version (cass.model_card). ``{dataset}``, ``{classes}``,
    ``{model}``, ``{version}``, ``{network}`` and ``{data_version}`` in the texts are filled in."""

    intended_use: str = Field(default=DEFAULT_INTENDED_USE, min_length=1, description="the card's intended use")
    limitations: str = Field(default=DEFAULT_LIMITATIONS, min_length=1, description="the card's limitations")
    file: str | None = Field(
        default=None, description="a markdown file (relative to the working directory) shown instead of "
        "intended_use and limitations, with the same placeholders"
    )


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
    quality: QualityConfig = QualityConfig()
    tune: TuneConfig = TuneConfig()
    retrain: RetrainConfig = RetrainConfig()
    card: CardConfig = CardConfig()

    @model_validator(mode="after")
    def _subgroups_for_gap(self) -> Params:
        if self.quality.max_subgroup_gap is not None and not self.data.group_columns:
            raise ValueError(
                "quality.max_subgroup_gap is set but data.group_columns is empty: name the subgroup columns "
                "(e.g. [site, sex]) or set max_subgroup_gap: null"
            )
        return self

    @model_validator(mode="after")
    def _fraction_listed(self) -> Params:
        for key, fraction in (
            ("finetune.label_fraction", self.finetune.label_fraction),
            ("pretrain.monitor_label_fraction", self.pretrain.monitor_label_fraction),
        ):
            if fraction is not None and fraction not in self.split.label_fractions:
                raise ValueError(
                    f"{key} {fraction} is not one of split.label_fractions "
                    f"{list(self.split.label_fractions)}; add it there so its subset file is written"
                )
        return self

    @model_validator(mode="after")
    def _derived(self) -> Params:
        """Resolve what the dataset implies: ``auto`` model names from its name, gate metrics from its task."""
        if self.mlflow.model_prefix == AUTO:
            self._set_derived("mlflow", model_prefix=f"cass-{self.data.name}")
        multilabel = get_layout(self.data.layout).multilabel(self.data)
        if self.quality.expected_metrics == AUTO:
            self._set_derived("quality", expected_metrics=task_metrics(multilabel))
        elif multilabel is not None and unwritten_metrics(self.quality.expected_metrics, multilabel):
            raise ValueError(metrics_fix(self.quality.expected_metrics, multilabel))
        return self

    def _set_derived(self, section: str, **values: Any) -> None:
        """Replace values of a section while validating; once validation returns, the object is frozen."""
        self.__dict__[section] = getattr(self, section).model_copy(update=values)


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
            hint = did_you_mean(loc[-1], allowed)
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
    """Load ``params.yaml``, apply ``section.key=value`` overrides, validate; a searched finetune key that
    an override sets is pinned (:func:`pin_overridden`)."""
    overrides = list(overrides)
    raw = apply_overrides(read_params_file(path), overrides)
    source = f"{path}" + (f" with overrides {overrides}" if overrides else "")
    return pin_overridden(params_from_mapping(raw, source), overrides)


def pin_overridden(params: Params, overrides: Iterable[str]) -> Params:
    """``params`` with each key of ``tune.space`` that an override sets (``--set finetune.lr=3e-4``) added
    to ``tune.pin``: a value given explicitly is neither searched by ``cass tune`` nor replaced by a tuned one."""
    explicit = [parts for parts, _ in map(parse_override, overrides)]
    keys = [f"finetune.{p[1]}" for p in explicit if len(p) == 2 and p[0] == "finetune" and p[1] in params.tune.space]
    pin = tuple(dict.fromkeys((*params.tune.pin, *keys)))
    if pin == params.tune.pin:
        return params
    return params.model_copy(update={"tune": params.tune.model_copy(update={"pin": pin})})


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
