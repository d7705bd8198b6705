"""MLflow tracking: one parent run per pipeline, a child run per stage, and the lineage of every result.

Where runs go: ``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from params.yaml. The demo
uses a local store (``sqlite:///mlflow.db`` + the ``mlruns/`` artifact folder, no server); production
points at an MLflow server (PostgreSQL backend store, S3 artifacts proxied by the server). A server is
checked with a short timeout BEFORE any training starts, so a wrong address fails in seconds, not
after hours of training.

Every run carries the tags ``git_commit``, ``data_version`` (the DVC md5 of the dataset), ``dataset``,
``label_fraction`` and ``network``; fine-tuning and evaluation runs also ``pretraining_run_id``.
Params are the flat ``section.key`` settings, so the compare view lines up across runs. Nothing that
looks like a credential (URI passwords, tokens, secret keys) is logged: values are redacted first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse, urlunparse

import yaml

from cass.config import MlflowConfig, Params, params_to_flat_dict
from cass.errors import CassError, TrainingError
from cass.training import EpochCallback

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_SCHEMES = ("sqlite", "file", "postgresql", "mysql", "mssql", "")
EVALUATION_DIR = "evaluation"
METRICS_ARTIFACT = f"{EVALUATION_DIR}/metrics.json"


class TrackingError(CassError):
    """The tracking server or the artifact store cannot be used."""

    exit_code = 6


# --------------------------------------------------------------------------------------------------
# Secrets never reach MLflow

_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<head>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&;\s]+"
)
_SECRET_WORDS = r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential)"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with URI passwords and secret query parameters replaced by ``***``."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """Redact a (nested) mapping: secret-looking keys lose their value, strings lose URI passwords."""

    def clean(key: str, value: Any) -> Any:
        if _SECRET_KEY.search(key) and value not in (None, ""):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(key, v) for v in value]
        return redact(value) if isinstance(value, str) else value

    return {k: clean(str(k), v) for k, v in values.items()}


_YAML_SECRET_LINE = re.compile(
    r"^(?P<head>[ \t-]*[\w.-]*" + _SECRET_WORDS + r"[\w.-]*[ \t]*:[ \t]*)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^#\n]*[^#\s])",
    re.IGNORECASE | re.MULTILINE,
)


def redact_yaml_text(text: str) -> str:
    """Redact a YAML file's text, keeping its comments and layout (so the logged file reads as the original)."""
    return _YAML_SECRET_LINE.sub(lambda m: f"{m['head']}'{REDACTED}'", redact(text))


def loggable_params(params: Params) -> dict[str, str]:
    """The flat ``section.key`` params, redacted, as strings (what MLflow stores)."""
    flat = redact_mapping(params_to_flat_dict(params))
    return {k: json.dumps(v, default=_jsonable) if isinstance(v, list | dict) else str(v) for k, v in flat.items()}


def _jsonable(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # settings objects nested in lists
    return dump(mode="json") if dump else str(obj)


# --------------------------------------------------------------------------------------------------
# Where runs go


def tracking_uri(cfg: MlflowConfig) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingError` unless the MLflow server at ``uri`` answers ``/health`` in ``timeout`` s.

    Local stores (SQLite, a folder) need no server and pass.
    """
    if not is_server(uri):
        return
    parsed = urlparse(uri)
    bare = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else ""))
    health = urlunparse(bare._replace(path=bare.path.rstrip("/") + "/health", query="", fragment=""))
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"the MLflow tracking server {redact(uri)} did not answer within {timeout:g} s ({problem}). Nothing "
        "was trained. Start the server, or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri (unset both to use "
        "the local store sqlite:///mlflow.db)."
    )


def _artifact_location(cfg: MlflowConfig, uri: str) -> str | None:
    loc = cfg.artifact_location
    if not loc:
        return None
    if "://" in loc:
        return loc
    if is_server(uri):
        return None  # the server decides (e.g. --artifacts-destination s3://...)
    return Path(loc).resolve().as_uri()


def configure_client(cfg: MlflowConfig) -> str:
    """Point MLflow (tracking and registry) at the store after checking it answers; returns the URI."""
    import mlflow

    uri = tracking_uri(cfg)
    check_tracking_server(uri, cfg.server_timeout_s)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that, or in a long-lived process (a worker
    # running several flows) the first run's URI would override every later run's settings.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


def reset_client() -> None:
    """Forget the store :func:`configure_client` chose; MLflow falls back to MLFLOW_TRACKING_URI or its default."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


def configure(cfg: MlflowConfig) -> str:
    """:func:`configure_client`, then make sure the experiment exists and is active; returns its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_client(cfg)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(cfg.experiment, _artifact_location(cfg, uri))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = client.get_experiment_by_name(cfg.experiment).experiment_id  # created meanwhile
        elif experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{cfg.experiment}' is deleted; restore it (`mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}`) or set mlflow.experiment to another name"
            )
        else:
            experiment_id = experiment.experiment_id
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {redact(uri)} refused the experiment '{cfg.experiment}': "
                            f"{redact(exc.message)}") from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# --------------------------------------------------------------------------------------------------
# Logging helpers


def with_retries(what: str, fn: Callable[[], T], cfg: MlflowConfig) -> T:
    """Run an upload, retrying with doubling delays; raise :class:`TrackingError` when every attempt failed."""
    delay = cfg.artifact_retry_delay_s
    for attempt in range(1, cfg.artifact_retries + 1):
        try:
            return fn()
        except CassError:
            raise
        except Exception as exc:  # any transport or store error: S3, HTTP, filesystem
            message = redact(f"{type(exc).__name__}: {exc}")[:600]
            if attempt == cfg.artifact_retries:
                raise TrackingError(f"{what} failed after {attempt} attempt(s): {message}") from None
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1f s", what, attempt, cfg.artifact_retries,
                        message, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def run_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """``tags`` plus MLflow's own context tags (source, user, git), all redacted.

    MLflow records the git remote URL by itself; a remote with an embedded token would otherwise leak.
    """
    from mlflow.tracking.context.registry import resolve_tags

    resolved = resolve_tags({k: str(v) for k, v in tags.items() if v is not None})
    return {k: redact(str(v)) for k, v in resolved.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def numeric_items(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items() if _finite(v) or isinstance(v, bool)}


def metric_key(text: str) -> str:
    """A metric name MLflow accepts (class names may hold any character)."""
    return re.sub(r"[^\w\-. /]", "_", text)


def epoch_logger(skip: tuple[str, ...] = ("epoch",)) -> EpochCallback:
    """An :data:`EpochCallback` that logs each epoch's metrics with ``step=epoch`` to the active run.

    A failed metrics call is a warning, not the end of the training: MLflow already retried it, and the
    artifacts at the end of the stage are uploaded with retries and fail the run if the store is gone.
    """
    import mlflow

    def callback(epoch: int, metrics: Mapping[str, float]) -> None:
        values = {metric_key(k): float(v) for k, v in metrics.items() if k not in skip and _finite(v)}
        try:
            mlflow.log_metrics(values, step=epoch)
        except Exception as exc:  # keep training; see above
            log.warning("could not log epoch %d metrics to MLflow: %s", epoch, redact(str(exc))[:300])

    return callback


def plot_history(history_csv: Path, out_png: Path, title: str) -> Path:
    """Loss curves (left) and the other per-epoch metrics (right) of one training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(history_csv)
    x = df["epoch"] if "epoch" in df else range(1, len(df) + 1)
    skip = {"epoch", "epoch_seconds", "images_per_second", "lr", "healthy_embedding_std"}
    losses = [c for c in df.columns if "loss" in c]
    others = [c for c in df.columns if c not in skip and c not in losses and pd.api.types.is_numeric_dtype(df[c])]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10 if others else 5, 4), squeeze=False)
    for c in losses:
        axes[0][0].plot(x, df[c], marker="o", label=c)
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_title(f"{title}: loss")
    axes[0][0].legend(fontsize=8)
    if others:
        for c in others:
            axes[0][1].plot(x, df[c], marker="o", label=c)
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_title(f"{title}: metrics")
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=100)
    plt.close(fig)
    return out_png


def test_set_hash(data_dir: Path) -> str:
    """Identifies the exact test split (paths, file hashes, labels): champions are compared only on one."""
    from cass.data.manifest import read_manifest

    df, _ = read_manifest(Path(data_dir))
    test = df[df["split"] == "test"].sort_values("path")
    rows = zip(test["path"], test["sha256"], test["labels"], strict=True)
    lines = "\n".join(f"{path}\t{sha}\t{labels}" for path, sha, labels in rows)
    return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Lineage:
    """The tags every run of one pipeline carries."""

    dataset: str
    label_fraction: float
    git_commit: str = ""
    data_version: str = ""
    test_set: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def tags(self, network: str, **more: str | None) -> dict[str, str]:
        tags = {
            "dataset": self.dataset,
            "label_fraction": f"{self.label_fraction:g}",
            "git_commit": self.git_commit or "unknown",
            "data_version": self.data_version or "untracked",
            "network": network,
            **({"test_set": self.test_set} if self.test_set else {}),
            **self.extra,
        }
        tags.update({k: v for k, v in more.items() if v})
        return tags


class RunLogger:
    """Logs into one MLflow run: metrics, artifacts (retried) and the stage outputs of cass.

    ``run_id`` names the run; None logs into this thread's active run."""

    def __init__(self, cfg: MlflowConfig, run_id: str | None = None) -> None:
        import mlflow

        self.cfg = cfg
        self.run_id = run_id
        self.mlflow = mlflow

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            return
        log_files = self.mlflow.log_artifacts if path.is_dir() else self.mlflow.log_artifact
        self._retry(f"uploading {path}", lambda: log_files(str(path), artifact_path, run_id=self.run_id))

    def text(self, text: str, artifact_file: str) -> None:
        self._retry(f"uploading {artifact_file}", lambda: self.mlflow.log_text(text, artifact_file, run_id=self.run_id))

    def metrics(self, values: Mapping[str, float], **kwargs: Any) -> None:
        if values:
            self.mlflow.log_metrics(dict(values), run_id=self.run_id, **kwargs)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(what, fn, self.cfg)

    def params_files(self, params: Params, params_file: Path | None) -> None:
        """The exact params.yaml (redacted) and the resolved settings after ``--set`` overrides."""
        if params_file is not None and Path(params_file).is_file():
            self.text(redact_yaml_text(Path(params_file).read_text()), "params.yaml")
        resolved = redact_mapping(params.model_dump(mode="json"))
        self.text(yaml.safe_dump(resolved, sort_keys=False), "params.resolved.yaml")

    def redacted_folder(self, folder: Path, artifact_path: str, exclude: tuple[str, ...] = ()) -> None:
        """Upload a report folder with credentials redacted from its text files."""
        with tempfile.TemporaryDirectory(prefix="cass-report-") as tmp:
            copy = Path(tmp) / "report"
            shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(*exclude))
            for f in copy.rglob("*"):
                if f.is_file() and f.suffix.lower() in {".json", ".html", ".yaml", ".yml", ".csv", ".txt", ".md"}:
                    with contextlib.suppress(UnicodeDecodeError):
                        f.write_text(redact(f.read_text()))
            self.artifact(copy, artifact_path)

    def training_stage(self, out_dir: Path, metrics_file: Path, history: Path, title: str) -> None:
        """Summary metrics (best_*, final_*), history.csv and the curves PNG of a training stage."""
        if metrics_file.is_file():
            self.metrics(numeric_items(json.loads(metrics_file.read_text())))
            self.artifact(metrics_file)
        if history.is_file():
            self.artifact(history)
            with tempfile.TemporaryDirectory(prefix="cass-plot-") as tmp:
                self.artifact(plot_history(history, Path(tmp) / "curves.png", title))
        spec = out_dir / "model.json"
        if spec.is_file():
            self.artifact(spec)

    def evaluation(self, eval_dir: Path, model_id: str | None = None) -> dict:
        """Test metrics (``test_*``, per class ``test_<class>_recall`` ...) and the evaluation files."""
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        values = numeric_items(metrics, "test_")
        for cls, scores in (metrics.get("per_class") or {}).items():
            for name in ("recall", "precision", "f1", "auroc"):
                if _finite(scores.get(name)):
                    values[metric_key(f"test_{cls}_{name}")] = float(scores[name])
        self.metrics(values, model_id=model_id) if model_id else self.metrics(values)
        self.artifact(eval_dir, EVALUATION_DIR)  # every file of the stage: plots, calibration, explanations
        return metrics


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str], parent_run_id: str | None = None) -> Iterator[str]:
    """A nested run, active in this thread for the block; ends FAILED when the block raises.

    ``parent_run_id`` names the parent explicitly (default: this thread's active run). MLflow keeps the
    active run per thread, so stages running in worker threads (Prefect tasks) pass the parent's id.
    """
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id, tags=run_tags(tags)) as run:
        yield run.info.run_id


# --------------------------------------------------------------------------------------------------
# The pipeline with tracking


@dataclass(frozen=True)
class TrackedPipeline:
    run_id: str
    results: dict[str, dict]
    versions: dict[str, str]
    promotions: dict[str, Any]
    pretraining: StageRun | None = None


@dataclass(frozen=True)
class StageRun:
    """The MLflow run of a stage; ``reused`` when an earlier run's outputs were used instead of training."""

    run_id: str
    reused: bool = False


@dataclass(frozen=True)
class FinetuneRun:
    """A fine-tuning run and the model it logged."""

    run_id: str
    model_id: str
    model_uri: str


def first_test_image(data_dir: Path) -> bytes:
    """The bytes of one test image: the input example logged with each model."""
    from cass.data.images import read_bytes
    from cass.data.manifest import read_manifest

    df, info = read_manifest(Path(data_dir))
    rows = df[df["split"] == "test"]
    rows = rows if len(rows) else df
    return read_bytes(Path(info.root) / rows["path"].iloc[0])


# The stages of a tracked pipeline. Each is a plain function of the settings, the output layout and run
# ids, so that `cass demo` (tracked_pipeline below) and the Prefect flow (flows/retrain.py, one task per
# stage, tasks in worker threads) run the same code. The parent run is never made active: every stage
# opens its child run with the parent's id, because MLflow's active-run stack is per thread.


def networks_tag(params: Params) -> str:
    return "+".join(params.finetune.networks)


def pipeline_lineage(params: Params, data_dir: Path) -> Lineage:
    """The lineage tags of a pipeline on prepared data: commit, DVC data version, test-split hash."""
    from cass.data.manifest import read_manifest
    from cass.lineage import data_version, git_commit

    _, info = read_manifest(Path(data_dir))
    return Lineage(
        params.data.name,
        params.finetune.label_fraction,
        info.git_commit or git_commit(),
        info.data_version or data_version(params.data.root),
        test_set_hash(data_dir),
    )


def start_pipeline_run(
    params: Params, layout, *, params_file: Path | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """Create the parent run of a pipeline on prepared data; returns its id.

    It carries the lineage tags, the flat params, params.yaml (redacted) and dataset.json. Uploading them
    proves the artifact store works before any training; a failure ends the run FAILED.
    """
    import mlflow

    cfg = params.mlflow
    experiment_id = configure(cfg)
    name = f"pipeline {params.data.name} lf={params.finetune.label_fraction:g}"
    lineage = pipeline_lineage(params, layout.data)
    all_tags = run_tags({**lineage.tags(networks_tag(params), stage="pipeline"), **(tags or {})})
    run_id = mlflow.MlflowClient().create_run(experiment_id, tags=all_tags, run_name=name).info.run_id
    try:
        mlflow.log_params(loggable_params(params), run_id=run_id)
        logger = RunLogger(cfg, run_id)
        logger.params_files(params, params_file)
        logger.artifact(layout.data / "dataset.json", "data")
    except BaseException:
        with contextlib.suppress(Exception):
            end_pipeline_run(run_id, "FAILED")
        raise
    return run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
    """Set the parent run's final tags and status (FINISHED, FAILED or KILLED)."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


@contextlib.contextmanager
def pipeline_run(
    params: Params, layout, *, params_file: Path | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
    """:func:`start_pipeline_run` for the block; the run ends FAILED (KILLED on Ctrl-C) when it raises."""
    run_id = start_pipeline_run(params, layout, params_file=params_file, tags=tags)
    try:
        yield run_id
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the error that ended the pipeline is what matters
            end_pipeline_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    end_pipeline_run(run_id)


@contextlib.contextmanager
def stage_run(
    params: Params, data_dir: Path, parent_run_id: str, stage: str, network: str | None = None, **tags: str | None
) -> Iterator[str]:
    """A child run of ``parent_run_id`` for one stage, with the lineage tags and the flat params."""
    import mlflow

    configure(params.mlflow)
    lineage = pipeline_lineage(params, data_dir)
    name = f"{stage}-{network}" if network else stage
    with child_run(name, lineage.tags(network or networks_tag(params), stage=stage, **tags), parent_run_id) as run_id:
        mlflow.log_params(loggable_params(params))
        yield run_id


def tracked_pretrain(params: Params, layout, parent_run_id: str, *, progress: bool = True) -> StageRun:
    """Pretrain in a child run, or reuse the finished pretraining on disk when it has the current settings.

    Reuse needs a finished checkpoint with the current fingerprint (settings and data, see
    :mod:`cass.retraining`) and a finished run that recorded it; that run's id is returned.
    """
    import mlflow

    from cass.pretrain import pretrain
    from cass.retraining import PRETRAIN_FINGERPRINT_TAG, pretrain_fingerprint, reusable_pretraining

    configure(params.mlflow)
    earlier = reusable_pretraining(params, layout.data, layout.pretrain)
    if earlier is not None:
        log.info("pretraining reused (run %s): %s holds a finished pretraining with these settings and data",
                 earlier, layout.pretrain)
        mlflow.MlflowClient().set_tag(parent_run_id, "pretraining_reused_from", earlier)
        return StageRun(earlier, reused=True)
    fingerprint = pretrain_fingerprint(params, layout.data)
    with stage_run(params, layout.data, parent_run_id, "pretrain", **{PRETRAIN_FINGERPRINT_TAG: fingerprint}) as run_id:
        out = pretrain(params, layout.data, layout.pretrain, callbacks=[epoch_logger()], progress=progress)
        logger = RunLogger(params.mlflow)
        logger.training_stage(out.out_dir, out.metrics, out.history, "pretraining")
        logger.artifact(out.networks)
    return StageRun(run_id)


def tracked_finetune(
    params: Params, layout, network: str, parent_run_id: str, pretraining_run_id: str | None = None,
    *, progress: bool = True,
) -> FinetuneRun:
    """Fine-tune ``network`` in a child run and log the model (a pyfunc that rebuilds it, no pickle)."""
    from cass.finetune import finetune
    from cass.serving import log_classifier

    pre_dir = layout.pretrain if params.finetune.init == "cass" else None
    tags = {"pretraining_run_id": pretraining_run_id}
    with stage_run(params, layout.data, parent_run_id, "finetune", network, **tags) as run_id:
        ft = finetune(params, layout.data, network, layout.finetune(network), pre_dir, callbacks=[epoch_logger()],
                      progress=progress)
        RunLogger(params.mlflow).training_stage(ft.out_dir, ft.metrics, ft.history, f"fine-tuning {network}")
        example = first_test_image(layout.data)
        model = with_retries(
            f"logging the {network} model", lambda: log_classifier(ft.out_dir, example), params.mlflow
        )
    return FinetuneRun(run_id, model.model_id, model.model_uri)


def tracked_evaluate(
    params: Params, layout, network: str, parent_run_id: str, finetuned: FinetuneRun,
    pretraining_run_id: str | None = None,
):
    """Evaluate ``network`` on the test split in a child run; returns the registry's Candidate."""
    import mlflow

    from cass.evaluate import evaluate
    from cass.registry import Candidate

    tags = {"pretraining_run_id": pretraining_run_id, "finetune_run_id": finetuned.run_id,
            "model_id": finetuned.model_id}
    with stage_run(params, layout.data, parent_run_id, "evaluate", network, **tags) as run_id:
        evaluate(params, layout.data, layout.finetune(network), layout.evaluate(network))
        metrics = RunLogger(params.mlflow).evaluation(layout.evaluate(network), finetuned.model_id)
        values = numeric_items(metrics, "test_")
        mlflow.log_metrics({f"{network}_{k}": v for k, v in values.items()}, run_id=parent_run_id)
    lineage = pipeline_lineage(params, layout.data)
    return Candidate(
        network=network,
        model_uri=finetuned.model_uri,
        metrics=metrics,
        tags=lineage.tags(network, pipeline_run_id=parent_run_id, evaluation_run_id=run_id,
                          arch=metrics.get("arch"), **tags),
    )


def log_quality(params: Params, layout, parent_run_id: str) -> None:
    """The quality gates' reports (Data Docs, result.json) into the parent run, when the gates wrote them."""
    folder = layout.root / "quality"
    if folder.is_dir():
        RunLogger(params.mlflow, parent_run_id).redacted_folder(
            folder, "data_quality", exclude=(layout.decode_cache.name,)
        )


def register_candidate(params: Params, candidate, parent_run_id: str) -> str:
    """Register ``candidate``; returns the version. Safe to retry: a version already registered from the
    same evaluation run (the answer lost on the way back) is found and completed, not registered twice."""
    import mlflow

    from cass import registry

    configure_client(params.mlflow)
    client = mlflow.MlflowClient()
    name = registry.model_name(params.mlflow, candidate.network)
    evaluation = candidate.tags.get("evaluation_run_id")
    done = [v for v in client.search_model_versions(f"name = '{name}'")
            if evaluation and v.tags.get("evaluation_run_id") == evaluation]
    if done:
        mv = done[0]
        if not mv.description:
            client.update_model_version(name, mv.version, description=registry.describe_version(params, candidate))
        if registry.model_card.CARD_TAG not in mv.tags:  # the card failed after the version was created
            registry.model_card.attach(params, candidate, name, mv.version, client,
                                       registry.describe_version(params, candidate))
    else:
        mv = registry.register(params, candidate, client)
    client.set_tag(parent_run_id, f"{candidate.network}_registered_version", f"{name}/{mv.version}")
    return str(mv.version)


def promote_candidate(params: Params, network: str, version: str, parent_run_id: str):
    """Promote a registered version behind the gate (:func:`cass.registry.promote`); returns the decision."""
    import mlflow

    from cass import registry

    configure_client(params.mlflow)
    result = registry.promote(registry.model_name(params.mlflow, network), version, params)
    mlflow.MlflowClient().set_tag(parent_run_id, f"{network}_promotion", result.summary())
    return result


def tracked_pipeline(
    params: Params,
    layout,
    *,
    params_file: Path | None = None,
    register: bool = True,
    promote: bool = True,
    progress: bool = True,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> TrackedPipeline:
    """The pipeline logged to MLflow, then registration and promotion of both networks.

    The stages of :func:`cass.pipeline.run_pipeline`, each in a child run of one parent run. The tracking
    store is checked before anything is prepared, and ``params.yaml`` uploaded before anything is trained.
    Any failure (an upload that failed every retry included) marks the runs FAILED and comes before
    registration, so the champion is untouched. The parent run records the run key (:mod:`cass.retraining`)
    and ``outcome=completed`` when every model gate passed and the registration and promotion were done.
    """
    from cass.data.prepare import prepare_data
    from cass.errors import GateFailed
    from cass.pipeline import ensure_demo_data, validate_data
    from cass.quality import validate_model
    from cass.retraining import COMPLETED, OUTCOME_TAG, RUN_KEY_TAG, run_key

    configure(params.mlflow)  # a tracking server that does not answer fails before anything is prepared
    on_stage("prepare")
    ensure_demo_data(params)
    prepare_data(params, layout.data)
    key = run_key(params, layout.data, tuning=False)
    with pipeline_run(params, layout, params_file=params_file, tags={RUN_KEY_TAG: key}) as run_id:
        try:
            validate_data(params, layout, on_stage)
        except GateFailed:
            with contextlib.suppress(Exception):  # the report says why; the gate's error is what matters
                log_quality(params, layout, run_id)
            raise
        pretraining = None
        if params.finetune.init == "cass":
            on_stage("pretrain")
            pretraining = tracked_pretrain(params, layout, run_id, progress=progress)
        pre_id = pretraining.run_id if pretraining else None
        results, candidates, gates_passed = {}, {}, True
        for network in params.finetune.networks:
            on_stage(f"finetune {network}")
            finetuned = tracked_finetune(params, layout, network, run_id, pre_id, progress=progress)
            on_stage(f"evaluate {network}")
            candidates[network] = tracked_evaluate(params, layout, network, run_id, finetuned, pre_id)
            results[network] = dict(candidates[network].metrics)
            gate = validate_model(params, layout.evaluate(network) / "metrics.json", layout.quality("model") / network,
                                  raise_on_failure=False)
            if not gate.success:  # the promotion applies the same gate and refuses the version
                gates_passed = False
                log.warning("%s", gate.summary())
        log_quality(params, layout, run_id)

        versions, promotions = {}, {}
        if register:
            for network, candidate in candidates.items():
                on_stage(f"register {network}")
                versions[network] = register_candidate(params, candidate, run_id)
        if register and promote:
            for network, version in versions.items():
                on_stage(f"promote {network}")
                promotions[network] = promote_candidate(params, network, version, run_id)
        if gates_passed and register and promote:
            import mlflow

            mlflow.MlflowClient().set_tag(run_id, OUTCOME_TAG, COMPLETED)
    return TrackedPipeline(run_id, results, versions, promotions, pretraining)


def register_outputs(params: Params, layout, networks: tuple[str, ...], params_file: Path | None = None) -> dict:
    """Log fine-tuned models already on disk (``cass finetune`` + ``cass evaluate``) and register them.

    For stage runs made outside a tracked pipeline (e.g. by ``dvc repro``): one run per network holds
    the fine-tuning files, the model and the evaluation; returns ``{network: ModelVersion}``.
    """
    import mlflow

    from cass import registry
    from cass.data.manifest import read_manifest
    from cass.finetune import FinetuneOutputs
    from cass.serving import log_classifier

    cfg = params.mlflow
    for network in networks:
        for path in (FinetuneOutputs(layout.finetune(network)).weights, layout.evaluate(network) / "metrics.json"):
            if not path.is_file():
                raise TrainingError(f"{path}: not found; run `cass finetune` and `cass evaluate` for {network} first")
    configure(cfg)
    logger = RunLogger(cfg)
    _, info = read_manifest(layout.data)
    lineage = Lineage(params.data.name, params.finetune.label_fraction, info.git_commit, info.data_version,
                      test_set_hash(layout.data))
    example = first_test_image(layout.data)
    versions = {}
    for network in networks:
        ft = FinetuneOutputs(layout.finetune(network))
        tags = run_tags(lineage.tags(network, stage="register"))
        with mlflow.start_run(run_name=f"register-{network}", tags=tags) as run:
            mlflow.log_params(loggable_params(params))
            logger.params_files(params, params_file)
            logger.training_stage(ft.out_dir, ft.metrics, ft.history, f"fine-tuning {network}")
            model = with_retries(f"logging the {network} model", lambda ft=ft: log_classifier(ft.out_dir, example), cfg)
            metrics = logger.evaluation(layout.evaluate(network), model.model_id)
            candidate = registry.Candidate(
                network=network,
                model_uri=model.model_uri,
                metrics=metrics,
                tags=lineage.tags(network, finetune_run_id=run.info.run_id, evaluation_run_id=run.info.run_id,
                                  arch=metrics.get("arch")),
            )
            versions[network] = registry.register(params, candidate)
    return versions
