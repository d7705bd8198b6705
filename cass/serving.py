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
model, so its probabilities equal those of ``cass evaluate``. Images are scored in batches
(:mod:`cass.inference`; ``params={"batch_size": N, "workers": N}``), which changes probabilities only by
float32 rounding (tests/test_predict.py bounds it).

The model is saved as *models from code*: MLflow stores a three-line script, the ``cass`` package
(``code_paths``) and the classifier files (``model.json`` + ``model.safetensors``), and rebuilds the
network from them on load. Nothing is unpickled, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION
set to false. Loading still runs the folder's script and may import its copy of ``cass``: the sha256 of
every code and classifier file is recorded in the MLmodel file's metadata (``cass_integrity``) and, as
the digest of that list, in a tag of the logged model on the tracking server; :func:`verify_model_folder`
checks them before :func:`load_verified` loads a model (:class:`~cass.errors.ModelIntegrityError`).

Bad input (no ``image`` column, bytes that are not an image) raises :class:`BadModelInput`, a
:class:`~cass.errors.DataError` that is also an ``MlflowException``: ``mlflow models serve`` answers it
with HTTP 400 and the message, without a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from cass.errors import DataError, ModelIntegrityError

IMAGE_COLUMN = "image"
MODEL_CODE_FILE = "cass_classifier.py"
INTEGRITY_KEY = "cass_integrity"  # MLmodel metadata: {"files": {path in the folder: sha256}, "digest": ...}
INTEGRITY_TAG = "cass.integrity_digest"  # the logged model's tag on the tracking server: the list's digest
_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
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


class BadModelInput(DataError, mlflow.exceptions.MlflowException):
    """Input the model cannot score: a DataError for cass (exit 3), an MlflowException with
    INVALID_PARAMETER_VALUE for MLflow's scoring server, which answers it with HTTP 400 and this message
    instead of a stack trace."""

    def __init__(self, message: str) -> None:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        mlflow.exceptions.MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)

    def __str__(self) -> str:
        return self.message


def _image_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadModelInput(
                f"input row {row}: the '{IMAGE_COLUMN}' text is not base64-encoded image bytes"
            ) from None
    raise BadModelInput(
        f"input row {row}: expected encoded image bytes (or base64 text) in '{IMAGE_COLUMN}', "
        f"got {type(value).__name__}"
    )


def _telemetry_off() -> None:
    """A served model (``mlflow models serve``) runs in a process MLflow started, whose telemetry client was
    set up when MLflow was imported: with telemetry off by default (:mod:`cass.telemetry`), drop that client so
    that nothing more is recorded or sent. Set MLFLOW_DISABLE_TELEMETRY=true where the server starts to
    silence it from the first request (docs/production.md)."""
    from cass.telemetry import disable_telemetry

    disable_telemetry()
    try:
        from mlflow.telemetry.client import set_telemetry_client
    except ImportError:  # an MLflow without usage telemetry
        return
    set_telemetry_client()  # None when telemetry is disabled


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Rebuilds the network from ``model.json`` + ``model.safetensors`` and classifies raw images."""

    def load_context(self, context) -> None:
        _telemetry_off()
        classifier = Path(context.artifacts[CLASSIFIER_ARTIFACT])
        verify_model_folder(classifier.parents[1], code=False)  # weights and spec as exported (mlflow models serve)
        self.load(classifier)

    def load(self, classifier: Path) -> None:
        """The network and its preprocessing from a classifier folder (``model.json`` + weights), unchecked:
        :meth:`load_context` verifies the model folder first."""
        from cass.inference import load_folder

        loaded = load_folder(classifier)
        self.model, self.spec, self.transform = loaded.model, loaded.spec, loaded.transform

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Probabilities of every row, in batches of ``params["batch_size"]`` (decoded by
        ``params["workers"]`` DataLoader processes, 0 by default: a request is usually small, and starting
        processes inside a scoring server costs more than it saves), ``params["lanes"]`` batches at once (0, the
        default: one per torch thread); any unusable row refuses the request."""
        from cass.inference import DEFAULT_BATCH_SIZE, classify, decided_labels

        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise BadModelInput(f"the input needs a column '{IMAGE_COLUMN}' of encoded image bytes; got {got}")
        params = params or {}
        batch_size, workers = int(params.get("batch_size", DEFAULT_BATCH_SIZE)), int(params.get("workers", 0))
        lanes = int(params.get("lanes", 0))
        if batch_size < 1 or workers < 0 or lanes < 0:
            raise BadModelInput(f"params: batch_size {batch_size} must be >= 1, workers {workers} and lanes {lanes} "
                                ">= 0")
        images = [_image_bytes(value, i) for i, value in enumerate(model_input[IMAGE_COLUMN].tolist())]
        probs = np.zeros((len(images), len(self.spec.classes)))
        for batch in classify(self.model, self.spec, self.transform, images, batch_size=batch_size, workers=workers,
                              lanes=lanes or None):
            if batch.failed:
                raise BadModelInput(batch.failed[0][1])
            probs[batch.indices] = batch.probs
        out = pd.DataFrame(probs, columns=list(self.spec.classes), index=model_input.index)
        if self.spec.multilabel:
            out[LABELS_COLUMN] = decided_labels(probs, self.spec)
        return out


def signature(classes: tuple[str, ...] | list[str], multilabel: bool = False):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from cass.inference import DEFAULT_BATCH_SIZE

    outputs = [ColSpec("double", c) for c in classes] + ([ColSpec("string", LABELS_COLUMN)] if multilabel else [])
    # Served requests may set the batch size, decoding processes and lanes: {"params": {"batch_size": 32}}.
    settings = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE), ParamSpec("workers", "long", 0),
                            ParamSpec("lanes", "long", 0)])
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema(outputs), params=settings)


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
    from cass.classifier import ClassifierSpec
    from cass.outputs import FinetuneOutputs

    out = FinetuneOutputs(Path(model_dir))
    spec = ClassifierSpec.from_file(out.spec)
    with tempfile.TemporaryDirectory(prefix="cass-model-") as tmp:
        staged = Path(tmp) / CLASSIFIER_ARTIFACT
        staged.mkdir()
        for file in (out.spec, out.weights):
            shutil.copy2(file, staged / file.name)
        code = Path(tmp) / MODEL_CODE_FILE
        code.write_text(_MODEL_CODE)
        package = Path(tmp) / "cass"
        shutil.copytree(Path(cass.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Where MLflow puts each file in the model folder, and its hash.
        files = {f"artifacts/{CLASSIFIER_ARTIFACT}/{f.name}": _sha256(f) for f in sorted(staged.iterdir())}
        files[MODEL_CODE_FILE] = _sha256(code)
        files.update({f"code/cass/{f.relative_to(package).as_posix()}": _sha256(f)
                      for f in sorted(package.rglob("*")) if f.is_file()})
        digest = integrity_digest(files)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={CLASSIFIER_ARTIFACT: str(staged)},
            code_paths=[str(package)],
            signature=signature(spec.classes, spec.multilabel),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image]}),
            pip_requirements=pip_requirements(),
            metadata={**calibration_metadata(spec), INTEGRITY_KEY: {"files": files, "digest": digest},
                      **kwargs.pop("metadata", {})},
            tags={**(kwargs.pop("tags", None) or {}), INTEGRITY_TAG: digest},
            **kwargs,
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def integrity_digest(files: dict[str, str]) -> str:
    """One hash for a model folder's list of file hashes (what the tracking server records)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _is_bytecode_cache(rel: str) -> bool:
    """A file Python may import instead of its source: never recorded, so never trusted."""
    return "__pycache__" in rel.split("/") or rel.endswith((".pyc", ".pyo"))


def verify_model_folder(folder: Path, expected_digest: str | None = None, *, code: bool = True) -> None:
    """Refuse a model folder whose files differ from the hashes recorded when it was logged.

    Checked: the MLmodel file loads the model from code (no pickle), from ``cass_classifier.py`` and the
    folder's ``code`` (with ``code``), every recorded file is there with its hash, and no other file sits
    in ``code/``, ``artifacts/`` or beside the script. A bytecode cache (``__pycache__``, ``*.pyc``) anywhere
    is refused: Python would run it instead of the checked source whenever its header matches, and no hash
    of it was recorded (:func:`load_verified` writes none and reads none). With
    ``expected_digest`` (the tracking server's record) the list of hashes itself must be the recorded one;
    without it the check catches accidental or partial changes, not a rewrite of MLmodel too."""
    import yaml

    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ModelIntegrityError(f"{folder}: not an MLflow model folder (no MLmodel file)")
    conf = yaml.safe_load(mlmodel.read_text()) or {}
    record = (conf.get("metadata") or {}).get(INTEGRITY_KEY) or {}
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelIntegrityError(
            f"{mlmodel}: no content hashes recorded ({INTEGRITY_KEY}); the model was logged by an older version "
            "or its MLmodel file was edited. Log and register it again (`cass register`)"
        )
    digest = integrity_digest(files)
    if expected_digest is not None and digest != expected_digest:
        raise ModelIntegrityError(
            f"{mlmodel}: its list of file hashes ({digest[:12]}) is not the one the tracking server recorded when "
            f"the model was logged ({expected_digest[:12]}); the model's files were replaced. Do not use it; "
            "register the model again from its training outputs"
        )
    if code:
        flavor = (conf.get("flavors") or {}).get("python_function") or {}
        loader = (flavor.get("loader_module"), flavor.get("code"), Path(str(flavor.get("model_code_path"))).name)
        if loader != (_CODE_LOADER, "code", MODEL_CODE_FILE):
            raise ModelIntegrityError(
                f"{mlmodel}: loads with {loader[0]} from {loader[2]} (code folder {loader[1]}), not with "
                f"{_CODE_LOADER} from {MODEL_CODE_FILE}; the MLmodel file was changed. Do not load it"
            )
    for rel, want in sorted(files.items()):
        if not code and not rel.startswith("artifacts/"):
            continue
        path = folder / rel
        if not path.is_file():
            raise ModelIntegrityError(f"{path}: missing from the model folder (recorded when it was logged)")
        if _sha256(path) != want:
            raise ModelIntegrityError(
                f"{path}: its content differs from the hash recorded when the model was logged "
                f"(sha256 {want[:12]}...); the folder was modified. Restore it or load the registered version"
            )
    if code:
        present = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}
        if cached := sorted(r for r in present if _is_bytecode_cache(r)):
            raise ModelIntegrityError(
                f"{folder / cached[0]}: a Python bytecode cache in the model folder ({len(cached)} such file(s)); "
                "Python would run it instead of the checked source, and it was not recorded when the model was "
                "logged. Remove it (`find <folder> -name __pycache__ -prune -exec rm -r {} +`) or load the "
                "registered version; serve a model folder with PYTHONDONTWRITEBYTECODE=1 so none is written"
            )
        checked = {r for r in present if r.startswith(("code/", "artifacts/")) or r.endswith(".py")}
        if extra := sorted(checked - set(files)):
            raise ModelIntegrityError(
                f"{folder / extra[0]}: not recorded when the model was logged ({len(extra)} such file(s)); "
                "the folder was modified. Remove it or load the registered version"
            )


def logged_model_id(version: Any) -> str | None:
    """The logged model behind a registered version (some stores leave ``model_id`` empty; its source
    ``models:/m-...`` names it too)."""
    source = str(getattr(version, "source", "") or "")
    from_source = source[len("models:/"):].split("/")[0] if source.startswith("models:/m-") else None
    return getattr(version, "model_id", None) or from_source


def recorded_digest(model_uri: str) -> str | None:
    """The digest the tracking server recorded for a ``models:/`` URI's logged model (None otherwise).

    The URI resolves as MLflow resolves it when loading: ``models:/<name>/<version>``, ``/latest``, a stage
    (``/Production``), an alias (``@champion``), or ``models:/<model id>``."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if not model_uri.startswith("models:/"):
        return None
    client = mlflow.MlflowClient()
    try:
        resolved = get_model_name_and_version(client, model_uri)
        # (id,) for models:/<model id>, else (name, version)
        model_id = resolved[0] if len(resolved) == 1 else logged_model_id(client.get_model_version(*resolved))
        if not model_id:
            return None
        return client.get_logged_model(model_id).tags.get(INTEGRITY_TAG)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(
            f"could not look up model {model_uri}: {exc.message}. Name a registered version as "
            "models:/<name>/<version>, models:/<name>/latest, models:/<name>/<stage> or models:/<name>@<alias> "
            "(a bare models:/<id> names a logged model by its id), or pass a model folder"
        ) from None


def calibration_metadata(spec) -> dict[str, Any]:
    """What the served model does to the logits: the temperature and, for multi-label data, the thresholds."""
    meta: dict[str, Any] = {"temperature": spec.temperature}
    if spec.multilabel:
        meta["thresholds"] = dict(zip(spec.classes, spec.thresholds or [spec.threshold] * len(spec.classes),
                                      strict=True))
    return meta


def model_identity(model_uri: str) -> dict[str, str]:
    """What the rows a model predicts say about it: registered name and version (for a ``models:/`` URI; a
    folder's name otherwise), the URI as given, and the digest of its file hashes (what a resumed run compares)."""
    import yaml
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    name, version = Path(model_uri.rstrip("/")).name, ""
    if model_uri.startswith("models:/"):
        resolved = get_model_name_and_version(mlflow.MlflowClient(), model_uri)
        name, version = (resolved[0], "") if len(resolved) == 1 else (str(resolved[0]), str(resolved[1]))
        digest = recorded_digest(model_uri) or ""
    elif Path(model_uri, "MLmodel").is_file():
        meta = (yaml.safe_load(Path(model_uri, "MLmodel").read_text()) or {}).get("metadata") or {}
        digest = str((meta.get(INTEGRITY_KEY) or {}).get("digest", ""))
    else:
        digest = ""
    return {"model_name": name, "model_version": version, "model_uri": model_uri, "digest": digest}


def _load_without_bytecode(folder: Path):
    """Load a checked folder so that Python neither writes bytecode into it (the folder stays as checked) nor
    reads any: ``sys.pycache_prefix`` sends cache lookups to an empty folder of our own for the load."""
    dont_write, prefix = sys.dont_write_bytecode, sys.pycache_prefix
    with tempfile.TemporaryDirectory(prefix="cass-pycache-") as empty:
        sys.dont_write_bytecode, sys.pycache_prefix = True, empty
        try:
            return mlflow.pyfunc.load_model(str(folder))
        finally:
            sys.dont_write_bytecode, sys.pycache_prefix = dont_write, prefix


def load_verified(model_uri: str):
    """Load a pyfunc model after :func:`verify_model_folder`: a local folder against its own MLmodel file,
    a ``models:/`` URI also against the digest the tracking server recorded for it."""
    local = Path(model_uri)
    expected = None
    try:
        if not local.is_dir():
            expected = recorded_digest(model_uri)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        verify_model_folder(local, expected)
        return _load_without_bytecode(local)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"could not load model {model_uri}: {exc.message}") from None
