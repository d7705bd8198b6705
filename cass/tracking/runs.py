"""MLflow runs: the lineage tags every run carries, a logger that writes into one run by id, and the runs
of a pipeline (one parent run, a child run per stage).

Every run carries the tags ``git_commit``, ``data_version`` (the DVC md5 of the dataset), ``dataset``,
``label_fraction`` and ``network``; fine-tuning and evaluation runs also ``pretraining_run_id``. Params
are the flat ``section.key`` settings, so the compare view lines up across runs; nothing that looks like
a credential is logged (:mod:`cass.tracking.redact`).

Runs are named by what sets them apart (:func:`run_label`): the dataset and its version, the label
fraction, the settings changed from the settings file and the start time, e.g. ``demo@0123abcd lf=0.1
finetune.lr=0.0005 11-30 16:40``; a stage run puts its stage first (``finetune-cnn demo@0123abcd ...``).
The prepared dataset is each run's MLflow dataset input (the Dataset column), its digest the data version.

The parent run of a pipeline is never made active: every stage opens its child run with the parent's id,
because MLflow's active-run stack is per thread and Prefect runs tasks in worker threads.

Every call to the store is bounded (:mod:`cass.tracking.client`) and a failure is one
:class:`~cass.tracking.client.TrackingError`. A tracking server that dies during a training stage does not
stop the training: the epochs it missed stay in ``history.csv`` (and are logged if it comes back), the
stage writes its outputs, and then its uploads fail the run with exit code 6. A run that cannot be ended
is recorded and ended at the next start (:func:`~cass.tracking.client.record_open_run`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cass.config import MlflowConfig, Params
from cass.outputs import INFO_FILE, EvaluateOutputs, FinetuneOutputs, Layout
from cass.registry import EVALUATION_DIR, finite
from cass.tracking.client import (
    configure,
    reaching,
    record_open_run,
    server_answers,
    tracking_error,
    with_retries,
)
from cass.tracking.redact import loggable_params, redact, redact_mapping, redact_yaml_text

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values
RUN_LABEL_TAG = "run_label"
"""The tag of a pipeline's parent run that holds its label; its stage runs are named after it."""
SHOWN_CHANGES = 3  # changed settings named in a run's label; more are counted ("+2 more")
# In the label already; tune.pin lists the keys a --set gave, which the label names with their values.
_NAMED_ELSEWHERE = ("data.", "finetune.label_fraction", "split.label_fractions", "tune.pin")


def numeric_items(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items() if finite(v) or isinstance(v, bool)}


def metric_key(text: str) -> str:
    """A metric name MLflow accepts (class names may hold any character)."""
    return re.sub(r"[^\w\-. /]", "_", text)


def run_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """``tags`` plus MLflow's own context tags (source, user, git), all redacted.

    MLflow records the git remote URL by itself; a remote with an embedded token would otherwise leak.
    """
    from mlflow.tracking.context.registry import resolve_tags

    resolved = resolve_tags({k: str(v) for k, v in tags.items() if v is not None})
    return {k: redact(str(v)) for k, v in resolved.items()}


# --------------------------------------------------------------------------------------------------
# Lineage


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


def data_digest(data_dir: Path, data_version: str = "") -> str:
    """The digest of the dataset input of a run: the DVC md5 of the data when DVC tracks it, else the
    content hash of the prepared manifest (every file's sha256, label and split), shortened as MLflow
    stores digests (36 characters)."""
    if data_version:
        return data_version[:36]
    from cass.run_keys import data_hash

    return data_hash(Path(data_dir))[:32]


def changed_settings(params: Params, base: Params | None) -> dict[str, str]:
    """The result-changing settings (:func:`cass.run_keys.result_settings`) in which ``params`` differs
    from ``base`` (the settings file without overrides), as ``section.key`` -> value; the data and the
    label fraction are named apart, where a run goes (MLflow, retries, workers) is not named."""
    from cass.run_keys import result_settings

    if base is None:
        return {}
    keys = set(result_settings(params, tuning=True))
    now, before = loggable_params(params), loggable_params(base)
    return {k: v for k, v in now.items()
            if k in keys and before.get(k) != v and not k.startswith(_NAMED_ELSEWHERE)}


def run_label(
    params: Params, digest: str, changed: Mapping[str, str] | None = None, when: datetime | None = None
) -> str:
    """What sets a run apart from the others of its experiment: ``<dataset>@<data version> lf=<label
    fraction>``, the changed settings (the first :data:`SHOWN_CHANGES`) and the start time (minutes)."""
    parts = [f"{params.data.name}@{digest[:8] or 'untracked'}", f"lf={params.finetune.label_fraction:g}"]
    items = list((changed or {}).items())
    parts += [f"{key}={value}" for key, value in items[:SHOWN_CHANGES]]
    if len(items) > SHOWN_CHANGES:
        parts.append(f"+{len(items) - SHOWN_CHANGES} more")
    parts.append((when or datetime.now()).strftime("%m-%d %H:%M"))
    return " ".join(parts)


def label_of(params: Params, data_dir: Path, data_version: str = "", *, base: Params | None = None,
             parent_run_id: str | None = None) -> str:
    """The :func:`run_label` a run is named after, wherever it runs: its pipeline's (the parent run's tag)
    for a stage of one, else the dataset on disk at ``data_version`` and the settings that differ from
    ``base`` (``cass register``, ``cass tune``, the runs of ``dvc repro``'s outputs)."""
    if parent_run_id:
        import mlflow

        label = mlflow.MlflowClient().get_run(parent_run_id).data.tags.get(RUN_LABEL_TAG, "")
        if label:
            return label
    return run_label(params, data_digest(data_dir, data_version), changed_settings(params, base))


def run_name(stage: str, label: str) -> str:
    """``<stage> <label>``: the stage first, so a search or the compare view tells the runs of one label apart."""
    return " ".join(filter(None, (stage, label)))


def test_set_hash(data_dir: Path) -> str:
    """Identifies the exact test split (paths, file hashes, labels): champions are compared only on one."""
    from cass.data.manifest import read_manifest

    df, _ = read_manifest(Path(data_dir))
    test = df[df["split"] == "test"].sort_values("path")
    rows = zip(test["path"], test["sha256"], test["labels"], strict=True)
    lines = "\n".join(f"{path}\t{sha}\t{labels}" for path, sha, labels in rows)
    return hashlib.sha256(lines.encode()).hexdigest()


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


def read_lineage(path: Path, stage: str) -> dict[str, Any]:
    """A stage's lineage.json; a :class:`TrainingError` naming the file and the command that writes it."""
    from cass.errors import TrainingError

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path}: not found; it is written by `cass {stage}` (outputs of an older version "
                            f"have none): rerun `cass {stage}` or `dvc repro`") from None
    except ValueError as exc:
        raise TrainingError(f"{path}: not valid JSON ({exc}); rerun `cass {stage}`") from None
    if not isinstance(doc, dict):
        raise TrainingError(f"{path}: expected a JSON object; rerun `cass {stage}`")
    return doc


def model_lineage(layout: Layout, network: str) -> tuple[Lineage, dict[str, Any]]:
    """The lineage tags of the fine-tuned ``network`` on disk, from the lineage.json beside its weights
    (the commit, data and settings it was trained with, never the current params.yaml), and that record.

    Refuses an evaluation of other weights than those on disk: its metrics would describe another model.
    """
    from cass.engine import file_digest
    from cass.errors import TrainingError

    ft = FinetuneOutputs(layout.finetune(network))
    record = read_lineage(ft.lineage, "finetune")
    evaluated = read_lineage(EvaluateOutputs(layout.evaluate(network)).lineage, "evaluate")
    weights = file_digest(ft.weights)
    if record.get("weights_sha256") != weights or evaluated.get("model_sha256") != weights:
        raise TrainingError(f"{ft.weights} is not the model {layout.evaluate(network)} and {ft.lineage} describe "
                            f"(weights changed since); rerun `cass evaluate --network {network}` or `dvc repro`")
    tuning = record.get("tuning") or {}
    pretraining = record.get("pretraining") or {}
    extra = {
        "arch": str(record.get("arch", "")),
        "model_sha256": weights,
        "evaluation_commit": str(evaluated.get("git_commit", "")),
        **({"tuned_params": ",".join(tuning.get("in_effect", [])), "tuned_from": str(tuning.get("file", ""))}
           if tuning else {}),
        **({"pretraining_weights_sha256": str(pretraining["weights_sha256"])}
           if pretraining.get("weights_sha256") else {}),
    }
    lineage = Lineage(str(record.get("dataset", "")), float(record.get("label_fraction", 0.0)),
                      str(record.get("git_commit", "")), str(record.get("data_version", "")),
                      test_set_hash(layout.data), {k: v for k, v in extra.items() if v})
    return lineage, record


def networks_tag(params: Params) -> str:
    return "+".join(params.finetune.networks)


# --------------------------------------------------------------------------------------------------
# Logging into one run


class RunLogger:
    """Logs into one MLflow run, named by id: params, tags, metrics, artifacts (uploads retried) and the
    outputs of the cass stages.

    Every call names its run instead of relying on MLflow's active run (kept per thread), so worker
    threads and processes (Prefect tasks, Optuna workers) log side by side.
    """

    def __init__(self, cfg: MlflowConfig, run_id: str) -> None:
        import mlflow

        self.cfg = cfg
        self.run_id = run_id
        self.mlflow = mlflow
        self._missed: list[tuple[int, dict[str, float]]] = []  # epochs the server did not take

    @classmethod
    def create(
        cls, cfg: MlflowConfig, experiment_id: str, name: str, tags: Mapping[str, str], parent_run_id: str | None = None
    ) -> RunLogger:
        """A new run (not made active) in ``experiment_id``, nested under ``parent_run_id`` when given."""
        import mlflow

        nested = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        with reaching(cfg, f"creating the run '{name}'"):
            run = mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags={**tags, **nested})
        return cls(cfg, run.info.run_id)

    def params(self, params: Params) -> None:
        """The flat ``section.key`` settings, redacted (MLflow sends them 100 to a request)."""
        values = {k: v[:MAX_PARAM_LENGTH] for k, v in loggable_params(params).items()}
        with reaching(self.cfg, f"logging the settings of run {self.run_id}"):
            self.mlflow.log_params(values, run_id=self.run_id)

    def tags(self, values: Mapping[str, str]) -> None:
        client = self.mlflow.MlflowClient()
        with reaching(self.cfg, f"tagging run {self.run_id}"):
            for key, value in values.items():
                client.set_tag(self.run_id, key, value)

    def metrics(self, values: Mapping[str, float], **kwargs: Any) -> None:
        """``kwargs``: ``step`` or ``model_id`` (the logged model the metrics describe)."""
        if values:
            with reaching(self.cfg, f"logging metrics of run {self.run_id}"):
                self.mlflow.log_metrics(dict(values), run_id=self.run_id, **kwargs)

    def epoch(self, epoch: int, record: Mapping[str, float], skip: tuple[str, ...] = ("epoch",)) -> None:
        """One epoch's metrics with ``step=epoch``: an epoch callback of the training stages.

        A failed call does not end the training: the epoch's metrics are in ``history.csv``, and they are
        logged with the next epoch if the server answers again (one short health request per epoch until
        then, so a dead server costs no more time). Metrics that a server which answers refuses are left
        out, with one warning. The uploads at the end of the stage fail the run if the server is still gone.
        """
        values = {metric_key(k): float(v) for k, v in record.items() if k not in skip and finite(v)}
        self._missed.append((epoch, values))
        if len(self._missed) > 1 and not server_answers(self.cfg):
            return  # said at the first missed epoch
        while self._missed:
            step, missed = self._missed[0]
            try:
                if missed:
                    self.mlflow.log_metrics(missed, run_id=self.run_id, step=step)
            except Exception as exc:  # keep training; see above
                if not server_answers(self.cfg):
                    log.warning("could not log epoch %d metrics to MLflow (the tracking server does not answer); "
                                "training goes on, the metrics are in history.csv and are logged if the server "
                                "answers again", epoch)
                    return
                # The server answers and refused these metrics: it would refuse them again, and keeping them
                # first in the queue would hold back every later epoch.
                log.warning("MLflow refused the epoch %d metrics of run %s (%s); they are left out of the run "
                            "(history.csv has them) and training goes on", step, self.run_id,
                            redact(str(exc))[:300])
            self._missed.pop(0)

    def dataset(self, data_dir: Path, name: str, digest: str, context: str) -> None:
        """The prepared dataset as the run's MLflow dataset input (the runs table's Dataset column):
        ``name`` and ``digest`` (the data version), its manifest's schema and row count, used for
        ``context`` (``training``, ``test``)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        from cass.data.manifest import read_manifest

        df, info = read_manifest(Path(data_dir))
        with warnings.catch_warnings():
            # MLflow registers its local-folder source twice ("can be interpreted in multiple ways") and hints
            # that integer columns cannot hold missing values (width, height never miss): noise in every run log.
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(df, source=str(info.root), name=name, digest=digest)
        entry = DatasetInput(data._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
        self._retry(f"logging the dataset input of run {self.run_id}",
                    lambda: self.mlflow.MlflowClient().log_inputs(self.run_id, datasets=[entry]))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED. When the server cannot be told, the run is recorded
        (:func:`~cass.tracking.client.record_open_run`) and :class:`TrackingError` raised."""
        end_run(self.cfg, self.run_id, status)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            return
        log_files = self.mlflow.log_artifacts if path.is_dir() else self.mlflow.log_artifact
        self._retry(f"uploading {path}", lambda: log_files(str(path), artifact_path, run_id=self.run_id))

    def text(self, text: str, artifact_file: str) -> None:
        self._retry(f"uploading {artifact_file}", lambda: self.mlflow.log_text(text, artifact_file, run_id=self.run_id))

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
        self.artifact(FinetuneOutputs(out_dir).spec)  # the model spec and lineage, when the stage wrote them
        lineage = FinetuneOutputs(out_dir).lineage
        if lineage.is_file():  # it holds the settings: credentials in them are redacted like the params
            self.text(json.dumps(redact_mapping(json.loads(lineage.read_text())), indent=2), lineage.name)

    def history(self, history_csv: Path) -> None:
        """Every row of a stage's history.csv as per-epoch metrics (``step`` = epoch): the curves of a
        training logged after the fact (``cass register``), as the epoch callback logs them during one."""
        import pandas as pd
        from mlflow.entities import Metric

        df = pd.read_csv(history_csv)
        now = int(time.time() * 1000)
        rows = []
        for i, row in enumerate(df.to_dict("records"), 1):
            step = int(row.get("epoch", i))
            values = {k: pd.to_numeric(v, errors="coerce") for k, v in row.items() if k != "epoch"}
            rows += [Metric(metric_key(k), float(v), now, step) for k, v in values.items() if math.isfinite(v)]
        for start in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics a request
            batch = rows[start:start + 1000]
            self._retry(f"logging {history_csv}", lambda b=batch: self.mlflow.MlflowClient().log_batch(
                self.run_id, metrics=b))

    def evaluation(self, eval_dir: Path, model_id: str | None = None) -> dict:
        """Test metrics (``test_*``, per class ``test_<class>_recall`` ...) and the evaluation files."""
        out = EvaluateOutputs(eval_dir)
        metrics = json.loads(out.metrics.read_text())
        values = numeric_items(metrics, "test_")
        for cls, scores in (metrics.get("per_class") or {}).items():
            for name in ("recall", "precision", "f1", "auroc"):
                if finite(scores.get(name)):
                    values[metric_key(f"test_{cls}_{name}")] = float(scores[name])
        self.metrics(values, **({"model_id": model_id} if model_id else {}))
        self.artifact(out.out_dir, EVALUATION_DIR)  # every file of the stage: plots, calibration, explanations
        return metrics


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


# --------------------------------------------------------------------------------------------------
# The runs of a pipeline


def end_run(cfg: MlflowConfig, run_id: str, status: str, active: bool = False) -> None:
    """Set the final status of ``run_id`` (``active``: it is this thread's active run, which is left too).

    When the store does not answer, the run is recorded to be ended at the next start and
    :class:`TrackingError` raised. For a run that is not active, a dead server is found with one short
    request, not MLflow's retries; an active run is left through ``mlflow.end_run`` (MLflow keeps the active
    run to itself, and only that call leaves it), which tells the store within the retries the
    ``mlflow.http_*`` settings bound.
    """
    import mlflow

    what = f"ending run {run_id} {status}"
    try:
        if not active and not server_answers(cfg):
            raise tracking_error(cfg, what)
        with reaching(cfg, what):
            if active:
                mlflow.end_run(status)  # leaves the active run first, then tells the store
            else:
                mlflow.MlflowClient().set_terminated(run_id, status)
    except BaseException:
        record_open_run(cfg, run_id, status)
        raise


@contextlib.contextmanager
def child_run(
    cfg: MlflowConfig, name: str, tags: Mapping[str, str], parent_run_id: str | None = None
) -> Iterator[str]:
    """A nested run, active in this thread for the block; ends FAILED when the block raises (KILLED on Ctrl-C).

    ``parent_run_id`` names the parent explicitly (default: this thread's active run). Stage runs are
    active runs because the model is logged into the active run (:func:`cass.serving.log_classifier`).
    When the block failed, a failure to end the run never hides the block's error.
    """
    import mlflow

    with reaching(cfg, f"starting the run '{name}'"):
        run = mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id, tags=run_tags(tags))
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException as exc:
        with contextlib.suppress(Exception):
            end_run(cfg, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", active=True)
        raise
    end_run(cfg, run_id, "FINISHED", active=True)


def start_pipeline_run(
    params: Params, layout: Layout, *, params_file: Path | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """Create the parent run of a pipeline on prepared data; returns its id.

    It carries the lineage tags, the flat params, params.yaml (redacted) and dataset.json. Uploading them
    proves the artifact store works before any training; a failure ends the run FAILED.
    """
    cfg = params.mlflow
    experiment_id = configure(cfg)
    lineage = pipeline_lineage(params, layout.data)
    digest = data_digest(layout.data, lineage.data_version)
    label = run_label(params, digest, changed_settings(params, _file_settings(params_file)))
    all_tags = run_tags({**lineage.tags(networks_tag(params), stage="pipeline"), RUN_LABEL_TAG: label, **(tags or {})})
    run = RunLogger.create(cfg, experiment_id, label, all_tags)
    try:
        run.params(params)
        run.params_files(params, params_file)
        run.artifact(layout.data / INFO_FILE, "data")
        run.dataset(layout.data, params.data.name, digest, "training")
    except BaseException:
        with contextlib.suppress(Exception):
            end_pipeline_run(params, run.run_id, "FAILED")
        raise
    return run.run_id


def _file_settings(params_file: Path | None) -> Params | None:
    """The settings file as written (no overrides), the base a run's changed settings are measured from;
    None when there is none or it no longer reads."""
    from cass.config import load_params
    from cass.errors import CassError

    if params_file is None or not Path(params_file).is_file():
        return None
    try:
        return load_params(params_file)
    except CassError:
        return None


def end_pipeline_run(
    params: Params, run_id: str, status: str = "FINISHED", tags: Mapping[str, str] | None = None
) -> None:
    """Set the parent run's final tags and status (FINISHED, FAILED or KILLED)."""
    run = RunLogger(params.mlflow, run_id)
    run.tags(tags or {})
    run.finish(status)


@contextlib.contextmanager
def stage_run(
    params: Params, data_dir: Path, parent_run_id: str, stage: str, network: str | None = None, *,
    context: str = "training", **tags: str | None
) -> Iterator[RunLogger]:
    """A child run of ``parent_run_id`` for one stage, with the lineage tags, the flat params and the
    dataset input (``context``); named ``<stage>[-<network>] <the parent's label>``."""
    configure(params.mlflow)
    lineage = pipeline_lineage(params, data_dir)
    label = label_of(params, data_dir, lineage.data_version, parent_run_id=parent_run_id)
    name = run_name(f"{stage}-{network}" if network else stage, label)
    with child_run(params.mlflow, name, lineage.tags(network or networks_tag(params), stage=stage, **tags),
                   parent_run_id) as run_id:
        run = RunLogger(params.mlflow, run_id)
        run.params(params)
        run.dataset(data_dir, params.data.name, data_digest(data_dir, lineage.data_version), context)
        yield run
