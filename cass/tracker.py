"""The tracker a stage talks to: what a stage run logs, and where, is the tracker's business, not the stage's.

Every stage (:mod:`cass.stages`) opens its run with ``tracker.stage(...)``, hands the run's ``epoch`` to the
engine as its epoch callback, and tells the run what the stage wrote; a tuning study asks
``tracker.study_runs(...)`` for the runs of its study and trials. :class:`Tracker` itself logs nothing: it
is what the untracked pipeline (``cass demo --no-mlflow``) and the training commands of the CLI (``cass
pretrain``, ``cass finetune``, ``cass evaluate``, so ``dvc repro``) run with. The MLflow tracker
(:class:`cass.tracking.tracker.MlflowTracker`) logs each stage as a child run of a pipeline's parent run,
the models, the evaluation and a study's trials.

In the spirit of MONAI's handlers: a stage has one implementation, and tracking is a handler attached to it,
never a second, tracked copy of the stage. This module imports neither MLflow nor :mod:`cass.tracking`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cass.config import Network, Params
    from cass.outputs import Layout
    from cass.registry import Candidate


class NullRun:
    """A run that logs nothing: the no-op tracker's stage, study and trial runs."""

    run_id: str | None = None

    def epoch(self, epoch: int, record: Mapping[str, float]) -> None:
        """The engine's epoch callback."""

    def tags(self, values: Mapping[str, str]) -> None:
        pass

    def metrics(self, values: Mapping[str, float], **kwargs: Any) -> None:
        pass

    def params(self, params: Params) -> None:
        pass

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def training_stage(self, out_dir: Path, metrics_file: Path, history: Path, title: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


NULL_RUN = NullRun()


@dataclass(frozen=True)
class LoggedModel:
    """A model a tracker logged: its id and URI (what registration takes)."""

    model_id: str
    model_uri: str


class NullStudyRuns:
    """The runs of a tuning study under the no-op tracker: none."""

    def study(self, params: Params, network: str, name: str, url: str) -> NullRun:
        return NULL_RUN

    def trial(self, parent: str | None, trial: Any, network: str, settings: Params, retry_of: int | None,
              base: Params) -> NullRun:
        return NULL_RUN

    def run(self, run_id: str | None) -> NullRun:
        """An existing run of the study, by id (a stale trial's, the study's own)."""
        return NULL_RUN

    def monitor(self, run: Any) -> contextlib.AbstractContextManager[None]:
        """System metrics of a trial while it trains."""
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Tracker:
    """The no-op tracker: every stage runs as it would tracked, and nothing is logged.

    Frozen and plain, so that a Prefect task and a tuning worker process can take it as an argument.
    ``parent_run_id``: the pipeline run a tracker nests its stage runs under (None: none).
    """

    parent_run_id: str | None = None

    def reused_pretraining(self, params: Params, layout: Layout) -> str | None:
        """The run of a finished pretraining on disk that the current settings would train again (none here:
        without a record of it, the pretraining stage runs and resumes what is on disk)."""
        return None

    @contextlib.contextmanager
    def stage(self, params: Params, layout: Layout, stage: str, network: str | None = None, *,
              context: str = "training", **tags: str | None) -> Iterator[Any]:
        """The run of one stage for the block; yields an object with NullRun's methods."""
        yield NULL_RUN

    def log_model(self, run: Any, layout: Layout, network: Network, out_dir: Path) -> LoggedModel | None:
        """Log a fine-tuned model into the stage's run (None: not logged)."""
        return None

    def candidate(self, run: Any, layout: Layout, network: Network, model: LoggedModel | None,
                  tags: Mapping[str, str | None]) -> Candidate | None:
        """What registration needs of an evaluated model, the evaluation logged to ``run`` (None: nothing)."""
        return None

    def study_runs(self, params: Params, data_dir: Path) -> Any:
        """The runs of a tuning study and its trials (:class:`NullStudyRuns`'s methods)."""
        return NullStudyRuns()


NO_TRACKER = Tracker()
