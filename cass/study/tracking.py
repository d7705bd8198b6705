"""Every MLflow call of a study: one parent run per study, one child run per cell, the report on the parent.

A child run carries the tags ``study`` (the study's key) and ``study_cell`` (the cell's key) and the params
``study.method``, ``study.fraction``, ``study.seed`` and ``study.network`` beside the cell's flat settings, so
MLflow's compare view lines the cells up. Runs are created by id (never made active), so cells running in
worker threads log side by side. A rerun of a killed study reopens its parent run, marks the child runs the
kill left running KILLED, and gives a finished cell that has no finished child run one from its result.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cass.study.plan import Cell, StudyPlan
from cass.tracking.client import configure, reaching
from cass.tracking.runs import RunLogger, numeric_items
from cass.tracking.tags import data_digest, networks_tag, pipeline_lineage, run_tags

log = logging.getLogger(__name__)

STUDY_TAG = "study"
CELL_TAG = "study_cell"


class StudyTracker:
    """The MLflow runs of one study."""

    def __init__(self, plan: StudyPlan, parent_run_id: str, experiment_id: str) -> None:
        self.plan = plan
        self.cfg = plan.params.mlflow
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id

    @classmethod
    def start(cls, plan: StudyPlan) -> StudyTracker:
        """The study's parent run: the one an earlier, unfinished run of this study left (study.json), else new."""
        import mlflow

        params, cfg = plan.params, plan.params.mlflow
        experiment_id = configure(cfg)
        earlier = plan.recorded("parent_run_id")
        if earlier:
            with reaching(cfg, f"reading run {earlier}"), contextlib.suppress(mlflow.exceptions.MlflowException):
                run = mlflow.MlflowClient().get_run(earlier)
                if run.info.lifecycle_stage == "active":
                    mlflow.MlflowClient().update_run(earlier, status="RUNNING")
                    log.info("study %s: resuming in MLflow run %s", plan.key, earlier)
                    return cls(plan, earlier, run.info.experiment_id)
        lineage = pipeline_lineage(params, plan.data_dir)
        name = f"study {params.data.name}@{plan.data_hash[:8]} {plan.key}"
        tags = run_tags({**lineage.tags(networks_tag(params), stage="study"), STUDY_TAG: plan.key})
        run = RunLogger.create(cfg, experiment_id, name, tags)
        run.params(params)
        run.dataset(plan.data_dir, params.data.name, data_digest(plan.data_dir, lineage.data_version), "study")
        plan.record(parent_run_id=run.run_id)
        return cls(plan, run.run_id, experiment_id)

    @classmethod
    def attach(cls, plan: StudyPlan) -> StudyTracker:
        """The parent run the study's flow opened (study.json), for a flow run of some of its cells elsewhere."""
        import mlflow

        parent = plan.recorded("parent_run_id")
        if not parent:
            raise RuntimeError(f"study {plan.key}: {plan.study_file} names no MLflow parent run; start the study "
                               "with `cass study` (or the study flow), which opens it")
        configure(plan.params.mlflow)
        with reaching(plan.params.mlflow, f"reading run {parent}"):
            run = mlflow.MlflowClient().get_run(parent)
        return cls(plan, parent, run.info.experiment_id)

    def _children(self) -> list[Any]:
        import mlflow

        query = f"tags.mlflow.parentRunId = '{self.parent_run_id}'"
        with reaching(self.cfg, f"listing the cell runs of study run {self.parent_run_id}"):
            return mlflow.search_runs([self.experiment_id], filter_string=query, output_format="list",
                                      max_results=10000)

    def finished_cells(self) -> dict[str, str]:
        """Cell key -> its finished child run."""
        return {r.data.tags[CELL_TAG]: r.info.run_id for r in self._children()
                if r.info.status == "FINISHED" and CELL_TAG in r.data.tags}

    def close_stale(self) -> int:
        """Child runs an earlier, killed run of the study left RUNNING: marked KILLED; returns how many."""
        stale = [r.info.run_id for r in self._children() if r.info.status == "RUNNING"]
        for run_id in stale:
            RunLogger(self.cfg, run_id).finish("KILLED")
        return len(stale)

    def _create(self, cell: Cell) -> RunLogger:
        params = self.plan.cell_params(cell)
        tags = {"dataset": params.data.name, "network": cell.network, "label_fraction": f"{cell.fraction:g}",
                "stage": "study-cell", STUDY_TAG: self.plan.key, CELL_TAG: cell.key}
        run = RunLogger.create(self.cfg, self.experiment_id, f"{cell.name} ({self.plan.key})", run_tags(tags),
                               self.parent_run_id)
        run.params(params)
        with reaching(self.cfg, f"logging the cell of run {run.run_id}"):
            run.mlflow.log_params({"study.method": cell.method, "study.fraction": f"{cell.fraction:g}",
                                   "study.seed": str(cell.seed), "study.network": cell.network}, run_id=run.run_id)
        return run

    @staticmethod
    def _result(run: RunLogger, result: Mapping[str, Any]) -> None:
        tested = ("macro_f1", "balanced_accuracy", "accuracy", "exact_match", "macro_auroc")
        values = {f"test_{k}" if k in tested else k: v for k, v in result.items()
                  if k not in {"seed", "label_fraction"}}
        run.metrics(numeric_items(values))

    @contextlib.contextmanager
    def cell_run(self, cell: Cell) -> Iterator[RunLogger]:
        """A child run for the block that trains ``cell``: FAILED when it raises, FINISHED after ``log_result``."""
        run = self._create(cell)
        try:
            yield run
        except BaseException as exc:
            with contextlib.suppress(Exception):
                run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def log_result(self, run: RunLogger, result: Mapping[str, Any]) -> None:
        self._result(run, result)
        run.finish("FINISHED")

    def log_done(self, cell: Cell, result: Mapping[str, Any]) -> None:
        """A child run for a cell that finished without one (the kill came between its result and its run)."""
        self.log_result(self._create(cell), result)

    def finish(self, report_dir: Path, summary: Mapping[str, float], tags: Mapping[str, str],
               status: str = "FINISHED") -> None:
        """The report folder and the summary metrics on the parent run, then its final status."""
        run = RunLogger(self.cfg, self.parent_run_id)
        run.metrics(numeric_items(summary))
        run.tags(tags)
        run.redacted_folder(Path(report_dir), "study")
        run.finish(status)

    def fail(self, status: str = "FAILED") -> None:
        RunLogger(self.cfg, self.parent_run_id).finish(status)
