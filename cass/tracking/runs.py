"""Logging into one MLflow run, named by id: params, tags, metrics (per epoch too), artifacts, the dataset input.

Every call to the store is bounded (:mod:`cass.tracking.client`) and a failure is one
:class:`~cass.tracking.client.TrackingError`. A tracking server that dies during a training stage does not
stop the training: the epochs it missed stay in ``history.csv`` (and are logged if it comes back), the
stage writes its outputs, and then its uploads fail the run with exit code 6. Nothing that looks like a
credential is logged (:mod:`cass.tracking.redact`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cass.config import MlflowConfig, Params
from cass.outputs import EvaluateOutputs, FinetuneOutputs
from cass.registry import EVALUATION_DIR, finite
from cass.tracking.client import reaching, record_open_run, server_answers, tracking_error, with_retries
from cass.tracking.plots import plot_history
from cass.tracking.redact import loggable_params, redact, redact_mapping, redact_yaml_text

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values


def numeric_items(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items() if finite(v) or isinstance(v, bool)}


def metric_key(text: str) -> str:
    """A metric name MLflow accepts (class names may hold any character)."""
    return re.sub(r"[^\w\-. /]", "_", text)

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
