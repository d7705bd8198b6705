"""A fine-tuned classifier as every consumer sees it: its spec (``model.json``: network, classes, input
size and normalisation, temperature and thresholds) and the network rebuilt from it with its weights.

Fine-tuning writes both (:mod:`cass.finetune`); evaluation, calibration, explanation, batched inference,
prediction and the served model read them from here, without depending on the training stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cass.config import DicomConfig, Network
from cass.errors import TrainingError
from cass.models import create_network
from cass.outputs import FinetuneOutputs
from cass.training import load_weights_file


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a fine-tuned classifier and preprocess its inputs."""

    network: str  # "cnn" or "vit"
    arch: str  # timm name
    image_size: int
    classes: tuple[str, ...]
    multilabel: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float = 0.5
    # Fitted on the validation split after fine-tuning (cass.calibration); absent from older model.json files.
    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None  # multi-label: one decision threshold per class
    # DICOM data: the pixel settings (data.dicom) it was trained with, so that prediction windows DICOM files alike.
    dicom: dict[str, Any] | None = None

    def dicom_settings(self) -> DicomConfig | None:
        """The pixel settings to decode DICOM inputs with (None: the defaults, for models of non-DICOM data)."""
        return DicomConfig(**self.dicom) if self.dicom is not None else None

    def to_json(self) -> str:
        d = asdict(self)
        d.update(classes=list(self.classes), mean=list(self.mean), std=list(self.std))
        d["thresholds"] = None if self.thresholds is None else list(self.thresholds)
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> ClassifierSpec:
        if not path.is_file():
            raise TrainingError(f"{path}: model spec not found; run `cass finetune` first")
        d = json.loads(path.read_text())
        d.update(classes=tuple(d["classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]))
        if d.get("thresholds") is not None:
            d["thresholds"] = tuple(d["thresholds"])
        return cls(**d)

    def build(self) -> nn.Module:
        role: Network = "vit" if self.network == "vit" else "cnn"
        return create_network(self.arch, len(self.classes), role, self.image_size)


def load_classifier(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ClassifierSpec]:
    out = FinetuneOutputs(Path(model_dir))
    spec = ClassifierSpec.from_file(out.spec)
    model = spec.build()
    load_weights_file(model, out.weights)
    return model.to(device).eval(), spec
