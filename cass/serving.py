"""A fine-tuned classifier as an MLflow pyfunc model: raw image bytes in, class probabilities out.

Input: a DataFrame with one column ``image`` holding each image's encoded file bytes (PNG, JPEG, TIFF,
...). Python callers pass ``bytes`` (base64 text is accepted too); over REST (``mlflow models serve``)
the column is sent base64-encoded, as MLflow does for binary columns::

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."]]}}

Output: one row per image and one float column per class: softmax probabilities, or per-class
sigmoid probabilities for multi-label data, of the logits divided by the temperature fitted on the
validation split (``temperature`` in ``model.json``, 1 for models saved before calibration existed). A
multi-label model adds a column ``labels``: the classes at or above their own threshold (``thresholds``
in ``model.json``, chosen on validation, see :mod:`cass.calibration`), joined with ``|``. Every image goes
through the same preprocessing as evaluation (8-bit RGB conversion, resize, normalisation), inside the
model, so its probabilities equal those of ``cass evaluate``.

The model is saved as *models from code*: MLflow stores a three-line script, the ``cass`` package
(``code_paths``) and the classifier files (``model.json`` + ``model.safetensors``), and rebuilds the
network from them on load. Nothing is unpickled, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION
set to false.
"""

from __future__ import annotations

import base64
import binascii
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from cass.calibration import probabilities
from cass.data.images import DEFAULT_MAX_PIXELS, decode_image, to_rgb8
from cass.errors import DataError

IMAGE_COLUMN = "image"
LABELS_COLUMN = "labels"
CLASSIFIER_ARTIFACT = "classifier"

# What the saved model needs to run; versions are pinned to the ones it was logged with.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pydantic",
    "pyyaml",
    "tqdm",
    "scikit-learn",
)

_MODEL_CODE = '''"""MLflow models-from-code entry point of a CASS classifier (written by cass.serving)."""
import mlflow

from cass.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
'''


def _image_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"input row {row}: the '{IMAGE_COLUMN}' text is not base64-encoded image bytes") from None
    raise DataError(
        f"input row {row}: expected encoded image bytes (or base64 text) in '{IMAGE_COLUMN}', "
        f"got {type(value).__name__}"
    )


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Rebuilds the network from ``model.json`` + ``model.safetensors`` and classifies raw images."""

    def load_context(self, context) -> None:
        from cass.config import AugmentConfig
        from cass.data.transforms import eval_transform
        from cass.finetune import load_classifier

        self.model, self.spec = load_classifier(Path(context.artifacts[CLASSIFIER_ARTIFACT]), "cpu")
        self.transform = eval_transform(self.spec.image_size, AugmentConfig(mean=self.spec.mean, std=self.spec.std))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise DataError(f"the input needs a column '{IMAGE_COLUMN}' of encoded image bytes; got {got}")
        rows = []
        for i, value in enumerate(model_input[IMAGE_COLUMN].tolist()):
            image = self.transform(to_rgb8(decode_image(_image_bytes(value, i), f"input row {i}", DEFAULT_MAX_PIXELS)))
            # One image per forward pass: batched kernels round differently with the batch's size, and the
            # temperature (often < 1) magnifies that; an image's probabilities must not depend on its neighbours.
            with torch.no_grad():
                logits = self.model(image[None]).float()
            rows.append(probabilities(logits.numpy(), self.spec.multilabel, self.spec.temperature)[0])
        probs = np.stack(rows) if rows else np.zeros((0, len(self.spec.classes)))
        out = pd.DataFrame(probs, columns=list(self.spec.classes), index=model_input.index)
        if self.spec.multilabel:
            cut = np.asarray(self.spec.thresholds if self.spec.thresholds is not None else self.spec.threshold)
            out[LABELS_COLUMN] = ["|".join(c for c, hit in zip(self.spec.classes, row, strict=True) if hit)
                                  for row in probs >= cut]
        return out


def signature(classes: tuple[str, ...] | list[str], multilabel: bool = False):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("double", c) for c in classes] + ([ColSpec("string", LABELS_COLUMN)] if multilabel else [])
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_classifier(model_dir: Path, example_image: bytes, name: str = "model", **kwargs: Any):
    """Log ``model_dir`` (a fine-tuning output) as a pyfunc model in the active run; returns ModelInfo.

    ``kwargs`` go to :func:`mlflow.pyfunc.log_model` (e.g. ``tags``, ``params``). The calibration the model
    applies (temperature, multi-label thresholds) is recorded in the MLmodel file's metadata too.
    """
    import cass
    from cass.finetune import ClassifierSpec
    from cass.layout import FinetuneOutputs

    out = FinetuneOutputs(Path(model_dir))
    spec = ClassifierSpec.from_file(out.spec)
    with tempfile.TemporaryDirectory(prefix="cass-model-") as tmp:
        staged = Path(tmp) / CLASSIFIER_ARTIFACT
        staged.mkdir()
        for file in (out.spec, out.weights):
            shutil.copy2(file, staged / file.name)
        code = Path(tmp) / "cass_classifier.py"
        code.write_text(_MODEL_CODE)
        package = Path(tmp) / "cass"
        shutil.copytree(Path(cass.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={CLASSIFIER_ARTIFACT: str(staged)},
            code_paths=[str(package)],
            signature=signature(spec.classes, spec.multilabel),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image]}),
            pip_requirements=pip_requirements(),
            metadata={**calibration_metadata(spec), **kwargs.pop("metadata", {})},
            **kwargs,
        )


def calibration_metadata(spec) -> dict[str, Any]:
    """What the served model does to the logits: the temperature and, for multi-label data, the thresholds."""
    meta: dict[str, Any] = {"temperature": spec.temperature}
    if spec.multilabel:
        meta["thresholds"] = dict(zip(spec.classes, spec.thresholds or [spec.threshold] * len(spec.classes),
                                      strict=True))
    return meta


def predict_files(model_uri: str, paths: list[Path]) -> pd.DataFrame:
    """Load ``model_uri`` (e.g. ``models:/cass-demo-cnn@champion``) and score image files.

    Returns ``path``, ``prediction`` (the most probable class) and one probability column per class.
    """
    from cass.data.images import read_bytes

    images = [read_bytes(Path(p)) for p in paths]
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"could not load model {model_uri}: {exc.message}") from None
    probs = model.predict(pd.DataFrame({IMAGE_COLUMN: images}))
    out = probs.copy()
    if LABELS_COLUMN in probs.columns:  # multi-label: the classes over their thresholds
        out.insert(0, "prediction", out.pop(LABELS_COLUMN))
    else:
        out.insert(0, "prediction", probs.idxmax(axis=1) if len(probs) else [])
    out.insert(0, "path", [str(p) for p in paths])
    return out
