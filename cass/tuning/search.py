"""A network's search, start to end: open the study, run its trials, write ``best_<network>.yaml``.

The tracker (:mod:`cass.tracker`) logs the study's run and closes it with the study's summary (the no-op
tracker logs nothing: an untracked pipeline tunes too). A database that stops answering ends the search with
one :class:`~cass.errors.StudyDatabaseError` (exit 11) and the study's run closed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cass.config import Network, Params, TuneConfig
from cass.errors import CassError, ConfigError, TrainingError
from cass.redaction import redact
from cass.tracker import NO_TRACKER, Tracker
from cass.training import EpochCallback
from cass.tuning.best_params import pinned_values, write_best_doc
from cass.tuning.storage import database_failure, resolve_storage, study_database
from cass.tuning.study import Objective, OpenStudy, open_study, study_progress, trial_loop
from cass.tuning.workers import run_trials

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def run_study(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None = None,
    *,
    workers: int = 1,
    storage: str | None = None,
    callbacks: Sequence[EpochCallback] = (),
    tracker: Tracker = NO_TRACKER,
) -> Path:
    """Search the fine-tuning settings of ``network``; returns the best-parameters file.

    Creates (or resumes) the study ``<tune.study_name>-<network>``, runs its trials with ``workers``
    processes here (other machines may join with :func:`cass.tuning.run_trials`), then writes
    ``<out_dir>/best_<network>.yaml`` from the best complete trial. ``tracker`` logs the study and its
    trials (the MLflow tracker nests the study's run under its ``parent_run_id``, a pipeline's run)."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    if not params.tune.searched:
        return _nothing_to_search(params, network, Path(out_dir))
    url = resolve_storage(params, out_dir, network, storage)
    opened = open_study(params, network, url, 0, Path(data_dir), tracker)
    if tracker.parent_run_id:
        opened.runs.run(opened.parent_run_id).tags({"mlflow.parentRunId": tracker.parent_run_id})
    pinned = pinned_values(params)
    log.info(
        "tuning %s: study %s in %s, %d trials over %s%s", network, opened.study.study_name, redact(url),
        params.tune.n_trials, ", ".join(params.tune.searched),
        f"; pinned: {', '.join(f'{k}={v!r}' for k, v in pinned.items())}" if pinned else "",
    )
    status, best_file, failure = "FAILED", None, None
    try:
        if workers == 1:  # the study is open already: run it here
            objective = Objective(params, Path(data_dir), network, Path(out_dir), pretrain_dir, opened, callbacks)
            trial_loop(opened, objective, params.tune)
        else:
            run_trials(params, data_dir, network, out_dir, pretrain_dir, workers=workers, storage=url,
                       callbacks=callbacks, tracker=tracker)
        with study_database(url, f"study '{opened.study.study_name}'"):
            best_file = write_best_params(opened.study, params, network, Path(out_dir))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except CassError as exc:
        failure = str(exc)
        raise
    finally:
        try:
            _end_study(opened, params.tune, best_file, status, failure)
        except Exception as exc:  # never hide the error that ended the study
            log.warning("could not close the study's run %s: %s", opened.parent_run_id, exc)
    return best_file


def write_best_params(study: optuna.Study, params: Params, network: str, out_dir: Path) -> Path:
    cfg = params.tune
    progress = study_progress(study)
    if progress.complete == 0:
        raise TrainingError(
            f"study '{study.study_name}': no trial completed ({progress.pruned} pruned, {progress.failed} failed); "
            "raise tune.n_trials or tune.pruner.n_startup_trials, or check the failed trials' log"
        )
    best = study.best_trial
    doc = {
        "network": network,
        "study": study.study_name,
        "trial": best.number,
        "objective": cfg.objective,
        "direction": cfg.study_direction,
        "value": best.value,
        "trials": {"complete": progress.complete, "pruned": progress.pruned, "failed": progress.failed},
        "finetune": {name: best.params[name] for name in cfg.searched if name in best.params},
        "pinned": pinned_values(params),
    }
    return write_best_doc(doc, network, out_dir, f"study {study.study_name}")


def _nothing_to_search(params: Params, network: str, out_dir: Path) -> Path:
    """Every key of tune.space is pinned: no study; the best-parameters file says so and holds no tuned value,
    only the pinned ones (``pinned:``), which a fine-tune with other settings takes (:func:`tuned_settings`)."""
    pinned = pinned_values(params)
    log.warning("tuning %s: every key of tune.space is pinned (%s); no trial runs, and fine-tuning uses the "
                "settings as they are", network, ", ".join(f"{k}={v!r}" for k, v in pinned.items()))
    doc = {"network": network, "objective": params.tune.objective, "finetune": {}, "pinned": pinned}
    return write_best_doc(doc, network, out_dir, "nothing to search: every key of tune.space is pinned")


def _end_study(opened: OpenStudy, cfg: TuneConfig, best_file: Path | None, status: str,
               failure: str | None = None) -> None:
    """Close the study's MLflow run with ``status``, even when its database is gone (then without the summary)."""
    run = opened.runs.run(opened.parent_run_id)
    try:
        if failure:
            run.tags({"failure": failure[:5000]})
        try:
            progress = study_progress(opened.study)
            summary: dict[str, float] = {
                "trials_complete": progress.complete,
                "trials_pruned": progress.pruned,
                "trials_failed": progress.failed,
            }
            if progress.complete:
                summary[f"best_{cfg.objective}"] = opened.study.best_value
                summary["best_trial"] = opened.study.best_trial.number
        except Exception as exc:
            if database_failure(exc) is None:
                raise
            log.debug("study run %s closes without its summary: %s", opened.parent_run_id, exc)
        else:
            run.metrics(summary)
        if best_file is not None:
            run.artifact(best_file)
    finally:
        run.finish(status)
