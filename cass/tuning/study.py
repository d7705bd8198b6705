"""The study and its trials: create or join a network's study, sample a trial's settings, fine-tune, prune.

Each trial fine-tunes one network with settings drawn from ``tune.space`` and reports the validation
objective after every epoch, so the pruner can stop trials that trail the others at the same epoch.
A running trial beats a heartbeat; when a worker dies, the next worker to look fails its trial and
queues it again. ``n_trials`` counts finished trials over all workers, so a study interrupted or spread
over pods ends with the same number of trials. A study refuses workers whose result-changing settings
differ, so trials of two experiments never mix.

The study's runs and its trials' go through the tracker's study runs (:meth:`cass.tracker.Tracker.study_runs`):
the MLflow tracker logs one run per study and a nested run per trial; the no-op tracker logs none.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass.config import CategoricalSpec, FloatSpec, IntSpec, Network, Params, TuneConfig
from cass.errors import ConfigError, TrainingError
from cass.redaction import redact
from cass.tracker import Tracker
from cass.training import EpochCallback
from cass.tuning.best_params import trial_params
from cass.tuning.storage import STORAGE_ENV, database_url, quiet_heartbeat_failures, study_database

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

SETTINGS_ATTR = "cass_settings"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
SURPLUS_ATTR = "surplus"
INTERRUPTED_ATTR = "interrupted"

# Settings that decide a trial's result. A study refuses workers whose settings differ in any of them,
# so trials of two different experiments never mix; the keys in _RUN_ONLY only say how or where to run.
_RESULT_SECTIONS = ("seed", "data.", "split.", "augment.", "model.", "pretrain.", "finetune.", "tune.")
_RUN_ONLY = (
    "data.root",
    "data.workers",
    "pretrain.num_workers",
    "pretrain.device",
    "finetune.networks",
    "finetune.num_workers",
    "finetune.device",
    "tune.enabled",
    "tune.n_trials",
    "tune.timeout",
    "tune.storage",
    "tune.study_name",
    "tune.heartbeat_interval",
    "tune.grace_period",
    "tune.max_retry",
)


def study_name(cfg: TuneConfig, network: str) -> str:
    return f"{cfg.study_name}-{network}"


@dataclass(frozen=True)
class StudyProgress:
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def counted(trials: Sequence[Any]) -> list[Any]:
    """Trials that count toward n_trials. A failed trial that was queued again is replaced by its copy;
    a surplus trial (started in a race for the last place) and one stopped by Ctrl-C are not results."""
    from optuna.trial import TrialState

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [
        t
        for t in trials
        if t.state != TrialState.FAIL
        or not (t.number in retried or t.user_attrs.get(SURPLUS_ATTR) or t.user_attrs.get(INTERRUPTED_ATTR))
    ]


def study_progress(study: optuna.Study) -> StudyProgress:
    from optuna.trial import TrialState

    states = [t.state for t in counted(study.get_trials(deepcopy=False))]
    return StudyProgress(
        *(
            states.count(s)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
        )
    )


class SurplusTrial(Exception):
    """Two workers took the last place of the budget at the same moment; the later trial stands down."""


def end_trial(run: Any, state: str, objective: str, value: float | None) -> None:
    """Record how the trial ended (``trial_state``: complete, pruned, failed, interrupted) and its best value."""
    run.tags({"trial_state": state})
    if value is not None:
        run.metrics({f"best_{objective}": value})
    run.finish({"failed": "FAILED", "interrupted": "KILLED"}.get(state, "FINISHED"))


class _OnStaleTrial:
    """Called by the live worker that finds a trial whose worker stopped beating: the trial is already
    failed by Optuna; mark its MLflow run failed too and queue the same settings again."""

    def __init__(self, max_retry: int, runs: Any) -> None:
        self.storage_kwarg, self._retry = _retry_callback(max_retry)
        self._max_retry = max_retry
        self._runs = runs

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retried = len(trial.system_attrs.get("retry_history", []))
        again = "queued again" if retried < self._max_retry else f"not queued again (retried {retried} times)"
        log.warning("trial %d of %s: its worker stopped beating; failed, %s", trial.number, study.study_name, again)
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            try:
                end_trial(self._runs.run(run_id), "failed", "", None)
            except Exception as exc:  # the re-queue matters more than the run's status
                log.warning("could not mark MLflow run %s of trial %d failed: %s", run_id, trial.number, exc)
        self._retry(study, trial)


def _retry_callback(max_retry: int) -> tuple[str, Any]:
    """Optuna's re-queue callback and the RDBStorage argument that takes it (renamed in Optuna 4.9)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            return "heartbeat_stale_trial_callback", RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        except ImportError:  # Optuna < 4.9
            from optuna.storages import RetryFailedTrialCallback

            return "failed_trial_callback", RetryFailedTrialCallback(max_retry=max_retry)


def _pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    import optuna

    p = cfg.pruner
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, p.n_startup_trials, p.n_warmup_steps)
    return optuna.pruners.MedianPruner(p.n_startup_trials, p.n_warmup_steps)


def _settings(params: Params) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", params.model_dump(mode="json"))
    return {
        k: v
        for k, v in sorted(flat.items())
        if k.startswith(_RESULT_SECTIONS) and not any(k == r or k.startswith(f"{r}.") for r in _RUN_ONLY)
    }


@dataclass
class OpenStudy:
    study: optuna.Study
    runs: Any  # the tracker's study runs
    parent_run_id: str | None
    url: str


def open_study(params: Params, network: str, url: str, worker_index: int, data_dir: Path,
               tracker: Tracker) -> OpenStudy:
    """Create or join the network's study; refuse one whose trials were run with other settings."""
    runs = tracker.study_runs(params, data_dir)
    with study_database(url, f"opening study '{study_name(params.tune, network)}'"):
        return _join_study(params, network, url, worker_index, runs)


def _join_study(params: Params, network: str, url: str, worker_index: int, runs: Any) -> OpenStudy:
    import optuna
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    cfg = params.tune
    name = study_name(cfg, network)
    if url.startswith("sqlite"):
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:  # a server: check pooled connections before use, and give up on one that does not answer
        engine = {"pool_pre_ping": True}
        if url.startswith("postgres"):
            engine["connect_args"] = {"connect_timeout": 30}
    seed = (params.seed if cfg.seed is None else cfg.seed) + worker_index
    on_stale = _OnStaleTrial(cfg.max_retry, runs)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in name only (since Optuna 2.9)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                database_url(url),
                engine_kwargs=engine,
                heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period,
                **{on_stale.storage_kwarg: on_stale},
            )
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            load_if_exists=True,
            direction=cfg.study_direction,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials),
            pruner=_pruner(cfg),
        )
    except DBAPIError:
        raise  # the server refused or did not answer: a StudyDatabaseError (study_database)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(
            f"cannot open the tuning storage {redact(url)}: {exc}. Use sqlite:///path/optuna.db or "
            f"postgresql://user@host:5432/db (--storage, ${STORAGE_ENV} or tune.storage)"
        ) from None
    if study.direction.name.lower() != cfg.study_direction:
        raise ConfigError(
            f"study '{name}' in {redact(url)} is set to {study.direction.name.lower()}, but tune.objective "
            f"{cfg.objective} needs {cfg.study_direction}; use another tune.study_name (--study)"
        )
    settings = _settings(params)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != settings:
        diff = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
        shown = ", ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"study '{name}' in {redact(url)} holds trials run with other settings ({shown}"
            f"{', ...' if len(diff) > 5 else ''}); use another tune.study_name (--study) or storage, "
            f"or delete the study (optuna delete-study --study-name {name} --storage URL)"
        )
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is None:
        parent = runs.study(params, network, name, url).run_id
        if parent is not None:  # the no-op tracker logs no study run
            study.set_user_attr(PARENT_RUN_ATTR, parent)
    return OpenStudy(study, runs, parent, url)


def _suggest(trial: optuna.Trial, name: str, spec: FloatSpec | IntSpec | CategoricalSpec) -> Any:
    if isinstance(spec, CategoricalSpec):
        return trial.suggest_categorical(name, list(spec.choices))
    if isinstance(spec, IntSpec):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


class Objective:
    """One trial: sample settings, fine-tune in a scratch folder, report and maybe prune per epoch."""

    def __init__(
        self,
        params: Params,
        data_dir: Path,
        network: Network,
        out_dir: Path,
        pretrain_dir: Path | None,
        opened: OpenStudy,
        callbacks: Sequence[EpochCallback],
    ) -> None:
        self.params, self.data_dir, self.network, self.pretrain_dir = params, data_dir, network, pretrain_dir
        self.trials_dir = Path(out_dir) / "trials" / network
        self.opened, self.callbacks = opened, callbacks

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from cass.finetune import finetune

        cfg = self.params.tune
        done = counted(trial.study.get_trials(deepcopy=False))
        if sum(t.number < trial.number for t in done) >= cfg.n_trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"the study already has its {cfg.n_trials} trials; this one does not run")
        frozen = next((t for t in done if t.number == trial.number), None)
        retry_of = frozen.system_attrs.get("failed_trial") if frozen is not None else None

        values = {name: _suggest(trial, name, spec) for name, spec in cfg.searched.items()}
        fixed = {} if cfg.epochs is None else {"epochs": cfg.epochs}
        settings = trial_params(self.params, {**values, **fixed}, f"tune trial {trial.number}")
        run = self.opened.runs.trial(self.opened.parent_run_id, trial, self.network, settings, retry_of, self.params)
        if run.run_id:
            trial.set_user_attr(RUN_ATTR, run.run_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        def report(epoch: int, record: Mapping[str, float]) -> None:
            run.epoch(epoch, record)
            value = float(record[cfg.objective])
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {cfg.objective} {value:.4f} trails the other trials")

        state, value = "failed", None
        try:
            self.trials_dir.mkdir(parents=True, exist_ok=True)
            with (tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-", dir=self.trials_dir) as tmp,
                  self.opened.runs.monitor(run)):
                out = finetune(
                    settings,
                    self.data_dir,
                    self.network,
                    Path(tmp),
                    self.pretrain_dir,
                    callbacks=[report, *self.callbacks],
                    progress=False,
                )
                summary = json.loads(out.metrics.read_text())
            value = float(summary[f"best_{cfg.objective}"])
            trial.set_user_attr("best_epoch", summary["best_epoch"])
            state = "complete"
            return value
        except optuna.TrialPruned:
            state = "pruned"
            raise
        except KeyboardInterrupt:
            state = "interrupted"  # stopped by the user: not a result, so it does not count (see counted)
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        finally:
            end_trial(run, state, cfg.objective, value)


def trial_loop(opened: OpenStudy, objective: Objective, cfg: TuneConfig) -> int:
    """Run trials until the study has ``n_trials`` finished ones (or the timeout); returns trials run.

    A worker that finds the last trials running elsewhere waits for them instead of leaving: if their
    worker dies, the trial is queued again and someone must be there to run it."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    study = opened.study
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    poll = max(1.0, min(cfg.heartbeat_interval / 2, 10.0))
    ran = 0
    with study_database(opened.url, f"study '{study.study_name}'"), quiet_heartbeat_failures():
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            progress = study_progress(study)
            if progress.finished >= cfg.n_trials:
                break
            if deadline is not None and time.monotonic() >= deadline:
                log.info("tune.timeout (%gs) reached; this worker starts no further trial", cfg.timeout)
                break
            if progress.waiting == 0 and progress.finished + progress.running >= cfg.n_trials:
                time.sleep(poll)
                continue
            study.optimize(objective, n_trials=1, catch=(TrainingError, SurplusTrial), gc_after_trial=True)
            ran += 1
    return ran
