"""The MLflow tracker: the handler that logs the stages of :mod:`cass.stages` and the trials of a study.

A stage run is a child run of the pipeline's parent run (``parent_run_id``), with the lineage tags, the
flat settings, the dataset input, system metrics while it trains and its per-epoch metrics (the run's
``epoch`` is the engine's epoch callback). Fine-tuning logs the model; evaluation logs the test metrics
(also on the fine-tuning run and, per network, on the parent run) and the manifest, and returns the
candidate that registration takes. A finished pretraining on disk with the current settings and data is
reused when a run recorded it. A tuning study gets one run, each trial a nested run (sampled settings,
per-epoch metrics, final state ``complete``/``pruned``/``failed``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cass import registry
from cass.config import MlflowConfig, Network, Params
from cass.outputs import Layout
from cass.redaction import redact
from cass.tracker import LoggedModel, Tracker
from cass.tracking.client import configure, with_retries
from cass.tracking.pipeline_runs import stage_run
from cass.tracking.runs import RunLogger, numeric_items
from cass.tracking.system import system_metrics
from cass.tracking.tags import (
    LineageTags,
    changed_settings,
    data_digest,
    label_of,
    model_lineage,
    run_label,
    run_name,
    run_tags,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlflowTracker(Tracker):
    """Logs every stage to MLflow (the ``mlflow:`` settings of the stage's params), nested under
    ``parent_run_id`` (a pipeline's run) when given."""

    def reused_pretraining(self, params: Params, layout: Layout) -> str | None:
        from cass.tracking.stages import reusable_pretraining

        configure(params.mlflow)
        earlier = reusable_pretraining(params, layout)
        if earlier is not None:
            log.info("pretraining reused (run %s): %s holds a finished pretraining with these settings and data",
                     earlier, layout.pretrain)
            if self.parent_run_id:
                RunLogger(params.mlflow, self.parent_run_id).tags({"pretraining_reused_from": earlier})
        return earlier

    @contextlib.contextmanager
    def stage(self, params: Params, layout: Layout, stage: str, network: str | None = None, *,
              context: str = "training", **tags: str | None) -> Iterator[RunLogger]:
        with stage_run(params, layout.data, self.parent_run_id, stage, network, context=context, **tags) as run:
            if context == "training":
                with system_metrics(params.mlflow, run.run_id):
                    yield run
            else:
                yield run

    def log_model(self, run: RunLogger, layout: Layout, network: Network, out_dir: Path) -> LoggedModel:
        """The model as a pyfunc that rebuilds it (no pickle), into the active fine-tuning run."""
        from cass.serving import log_classifier
        from cass.tracking.stages import first_test_image

        example = first_test_image(layout.data)
        model = with_retries(f"logging the {network} model", lambda: log_classifier(out_dir, example), run.cfg)
        return LoggedModel(model.model_id, model.model_uri)

    def candidate(self, run: RunLogger, layout: Layout, network: Network, model: LoggedModel | None,
                  tags: Mapping[str, str | None]) -> registry.Candidate:
        """The test metrics (``test_*``) and files into the evaluation run, on the fine-tuning run (beside its
        settings and curves, what one compares) and per network on the parent run; the manifest it was tested on."""
        from cass.tracking.stages import keep_manifest

        if model is None:
            raise ValueError(f"{network}: no logged model to evaluate; fine-tune it with the MLflow tracker first")
        metrics = run.evaluation(layout.evaluate(network), model.model_id)
        all_tags = {**tags, "manifest_sha256": keep_manifest(run, layout.data)}
        values = numeric_items(metrics, "test_")
        if self.parent_run_id:
            RunLogger(run.cfg, self.parent_run_id).metrics({f"{network}_{k}": v for k, v in values.items()})
        if tags.get("finetune_run_id"):
            RunLogger(run.cfg, str(tags["finetune_run_id"])).metrics(values)
        lineage, _ = model_lineage(layout, network)  # what the fine-tuning recorded beside the weights
        return registry.Candidate(
            network=network,
            model_uri=model.model_uri,
            metrics=metrics,
            tags=lineage.tags(network, pipeline_run_id=self.parent_run_id, evaluation_run_id=run.run_id,
                              **all_tags),
        )

    def study_runs(self, params: Params, data_dir: Path) -> StudyRuns:
        return StudyRuns.open(params, data_dir, self.parent_run_id)


@dataclass(frozen=True)
class StudyRuns:
    """Where a study's runs go, the lineage tags they carry and the data they train on, looked up once per
    worker. Runs are named like the pipeline's (:func:`cass.tracking.label_of`): ``tune-<network> <label>``
    (a pipeline's label when the study runs in one), and each trial after the values it tries. Each is a
    RunLogger addressed by id (no active-run state), so worker processes and Optuna's stale-trial callback
    log side by side."""

    cfg: MlflowConfig
    experiment_id: str
    lineage: LineageTags
    data_dir: Path
    label: str
    parent_run_id: str | None = None

    @classmethod
    def open(cls, params: Params, data_dir: Path, parent_run_id: str | None = None) -> StudyRuns:
        from cass.lineage import data_version, git_commit

        experiment_id = configure(params.mlflow)  # checks a server answers before any trial
        data = params.data
        lineage = LineageTags(data.name, params.finetune.label_fraction, git_commit(), data_version(data.root))
        label = label_of(params, data_dir, lineage.data_version, parent_run_id=parent_run_id)
        return cls(params.mlflow, experiment_id, lineage, Path(data_dir), label, parent_run_id)

    def _dataset(self, run: RunLogger, params: Params) -> None:
        digest = data_digest(self.data_dir, self.lineage.data_version)
        run.dataset(self.data_dir, params.data.name, digest, "training")

    def study(self, params: Params, network: str, name: str, url: str) -> RunLogger:
        """The study's run (nested under the pipeline's parent run when there is one)."""
        tags = run_tags(self.lineage.tags(network, stage="tune", study=name, storage=redact(url)))
        run = RunLogger.create(self.cfg, self.experiment_id, run_name(f"tune-{network}", self.label), tags)
        run.params(params)
        self._dataset(run, params)
        return run

    def trial(self, parent: str | None, trial: Any, network: str, settings: Params, retry_of: int | None,
              base: Params) -> RunLogger:
        """A trial's run, nested under the study's, named after the values it tries (``settings`` vs ``base``)."""
        tags = self.lineage.tags(
            network,
            stage="tune-trial",
            study=trial.study.study_name,
            trial=str(trial.number),
            worker=f"{socket.gethostname()}:{os.getpid()}",
            retry_of=None if retry_of is None else str(retry_of),
        )
        label = run_label(settings, data_digest(self.data_dir, self.lineage.data_version),
                          changed_settings(settings, base))  # the values this trial tries
        run = RunLogger.create(self.cfg, self.experiment_id, run_name(f"{network}-trial-{trial.number}", label),
                               tags, parent)
        run.params(settings)
        self._dataset(run, settings)
        return run

    def run(self, run_id: str | None) -> RunLogger | Any:
        from cass.tracker import NULL_RUN

        return RunLogger(self.cfg, run_id) if run_id else NULL_RUN

    def monitor(self, run: RunLogger) -> contextlib.AbstractContextManager[None]:
        return system_metrics(self.cfg, run.run_id)
