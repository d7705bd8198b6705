"""A fine-tuned classifier as an MLflow pyfunc model: raw image bytes in, class probabilities out.

Input: a DataFrame with one column ``image`` holding each image's encoded file bytes (PNG, JPEG, TIFF,
...). Python callers pass ``bytes`` (base64 text is accepted too); over REST (``mlflow models serve``)
the column is sent base64-encoded, as MLflow does for binary columns::

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."]]}}

Output: one row per image and one float column per class: softmax probabilities, or per-class
sigmoid probabilities for multi-label data. Every image goes through the same preprocessing as
evaluation (8-bit RGB conversion, resize, normalisation), inside the model.

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

from cass.data.images import DEFAULT_MAX_PIXELS, decode_image, to_rgb8
from cass.errors import DataError

IMAGE_COLUMN = "image"
CLASSIFIER_ARTIFACT = "classifier"
BATCH_SIZE = 64

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
        values = model_input[IMAGE_COLUMN].tolist()
        chunks = []
        for start in range(0, len(values), BATCH_SIZE):
            batch = [
                self.transform(to_rgb8(decode_image(_image_bytes(v, start + i), f"input row {start + i}",
                                                     DEFAULT_MAX_PIXELS)))
                for i, v in enumerate(values[start : start + BATCH_SIZE])
            ]
            with torch.no_grad():
                logits = self.model(torch.stack(batch)).float()
            probs = torch.sigmoid(logits) if self.spec.multilabel else torch.softmax(logits, dim=-1)
            chunks.append(probs.numpy().astype(np.float64))
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(self.spec.classes)))
        return pd.DataFrame(probs, columns=list(self.spec.classes), index=model_input.index)


def signature(classes: tuple[str, ...] | list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema([ColSpec("double", c) for c in classes])
    )


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

    ``kwargs`` go to :func:`mlflow.pyfunc.log_model` (e.g. ``tags``, ``params``).
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
            signature=signature(spec.classes),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image]}),
            pip_requirements=pip_requirements(),
            **kwargs,
        )


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
    out.insert(0, "prediction", probs.idxmax(axis=1) if len(probs) else [])
    out.insert(0, "path", [str(p) for p in paths])
    return out
