"""Settings of the data: the dataset and its layout, DICOM pixels, the splits and the augmentations."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cass.config_base import AUTO, Section
from cass.data.dicom_presets import DICOM_SUBGROUPS, WINDOW_PRESETS
from cass.data.layouts import get_layout
from cass.errors import did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CsvLayout(Section):
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


class DicomConfig(Section):
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


class DataConfig(Section):
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


class SplitConfig(Section):
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


class AugmentConfig(Section):
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
