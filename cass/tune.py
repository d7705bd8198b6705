"""Stage ``tune``: an Optuna search over fine-tuning settings, from one process to many workers.

Each trial fine-tunes one network with settings drawn from ``tune.space`` and reports the validation
objective after every epoch, so the pruner can stop trials that trail the others at the same epoch.
Workers share a study through its storage: a SQLite file by default, PostgreSQL for several machines.
A running trial beats a heartbeat; when a worker dies, the next worker to look fails its trial and
queues it again. ``n_trials`` counts finished trials over all workers, so a study interrupted or spread
over pods ends with the same number of trials. The best settings go to ``best_<network>.yaml``, which
``cass finetune --best-params`` applies over ``params.yaml`` (and DVC declares as a dependency).
A pinned key (``tune.pin``, or a ``--set finetune.<key>``) is not searched and keeps its value over that
file; which values came from tuning is logged, and tagged on a tracked fine-tune run.

Faults: a worker that dies is replaced by the others (its trial is queued again), and the study's result
is judged by the study, not by the workers' exit codes; a database that stops answering ends the command
with one :class:`~cass.errors.StudyDatabaseError` (exit 11) and every MLflow run of the study closed.

MLflow: one parent run per study, one child run per trial (sampled settings, per-epoch metrics, final
state ``complete``/``pruned``/``failed``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cass.config import (
    CategoricalSpec,
    FloatSpec,
    IntSpec,
    MlflowConfig,
    Network,
    Params,
    TuneConfig,
    params_from_mapping,
)
from cass.errors import CassError, ConfigError, StudyDatabaseError, TrainingError, exception_chain
from cass.finetune import finetune
from cass.io import atomic_write_text
from cass.outputs import best_params_path, optuna_storage_file
from cass.tracking import (
    Lineage,
    RunLogger,
    changed_settings,
    configure,
    data_digest,
    label_of,
    redact,
    run_label,
    run_name,
    run_tags,
)
from cass.tracking.system import system_metrics
from cass.training import EpochCallback

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

STORAGE_ENV = "CASS_TUNE_STORAGE"
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


def resolve_storage(params: Params, out_dir: Path, network: str, storage: str | None = None) -> str:
    """The study's database URL: ``storage`` (--storage), then $CASS_TUNE_STORAGE, then tune.storage,
    else a SQLite file per network under ``out_dir``. Keep passwords in the variable, not in params.yaml."""
    url = storage or os.environ.get(STORAGE_ENV) or params.tune.storage
    if url:
        return url
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{optuna_storage_file(out_dir, network).resolve()}"


def database_url(url: str) -> str:
    """``url`` for SQLAlchemy. SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; where only
    psycopg2 is installed (the usual wheel), name that driver instead of failing to import."""
    import importlib.util

    bare = url.startswith("postgresql://")
    if bare and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


# --------------------------------------------------------------------------------------------------
# Settings of one trial, and the best-parameters file


def trial_params(params: Params, values: Mapping[str, Any], source: str = "tune trial") -> Params:
    """``params`` with finetune keys replaced by ``values``, validated like params.yaml itself."""
    raw = params.model_dump()
    raw["finetune"].update(values)
    return params_from_mapping(raw, source)


def read_best_params(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: best-parameters file not found; run `cass tune` first or drop --best-params")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("finetune"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'finetune:' section of settings, as `cass tune` writes")
    return doc


@dataclass(frozen=True)
class TunedSettings:
    """The settings fine-tuning runs with, and which of their values came from a best-parameters file."""

    params: Params
    tuned: dict[str, Any]  # finetune key -> the tuned value now in params
    # finetune key not tuned -> the value now in params: kept by tune.pin here, or the study's pin (the file's
    # ``pinned:``) carried over the settings
    pinned: dict[str, Any]
    source: str  # "<file> (trial <n> of study <name>)"

    def tags(self) -> dict[str, str | None]:
        """MLflow tags of the fine-tune run: ``tuned_from``, and ``tuned_keys`` and ``pinned_keys``
        (comma-separated ``finetune.<key>``; None, so not set, when there is none)."""
        return {
            "tuned_from": self.source,
            "tuned_keys": ",".join(f"finetune.{k}" for k in sorted(self.tuned)) or None,
            "pinned_keys": ",".join(f"finetune.{k}" for k in sorted(self.pinned)) or None,
        }


def tuned_settings(params: Params, path: Path, network: str | None = None) -> TunedSettings:
    """``params`` with the finetune settings of a ``best_<network>.yaml`` file, validated; keys pinned in
    ``tune.pin`` keep the value of ``params``, and the study's own pins (the file's ``pinned:``) that are not
    pinned here apply as the file holds them. Logs which values come from the file and which are pinned."""
    doc = read_best_params(path)
    if network is not None and doc.get("network") not in (None, network):
        raise ConfigError(f"{path}: holds the best settings of the {doc['network']}, not of the {network}")
    pinned = params.tune.pinned
    tuned = {k: v for k, v in doc["finetune"].items() if k not in pinned}
    study_pins = {str(k).removeprefix("finetune."): v for k, v in (doc.get("pinned") or {}).items()}
    # The study's own pins belong to its best settings (every trial ran with them), unless pinned here again.
    carried = {k: v for k, v in study_pins.items() if k not in pinned and k not in tuned}
    kept = {k: getattr(params.finetune, k) for k in dict.fromkeys([*doc["finetune"], *study_pins]) if k in pinned}
    result = trial_params(params, {**tuned, **carried}, f"{path} (best parameters over the settings)")
    origin = f"trial {doc['trial']} of study {doc['study']}" if "trial" in doc and "study" in doc else "tuning"
    source = f"{path} ({origin})"
    who = f"{network}: " if network else ""
    if tuned:
        log.info("%stuned settings from %s: %s", who, source, ", ".join(
            f"finetune.{k}={v!r} (was {getattr(params.finetune, k)!r})" for k, v in sorted(tuned.items())))
    else:
        log.info("%s%s holds no tuned setting; %s", who, path,
                 "only the study's pinned values below apply" if carried else "every value comes from the settings")
    if kept:
        log.info("%spinned by tune.pin, not tuned: %s", who,
                 ", ".join(f"finetune.{k}={v!r}" for k, v in sorted(kept.items())))
    if carried:
        log.info("%spinned in the study, not tuned: %s", who, ", ".join(
            f"finetune.{k}={v!r} (was {getattr(params.finetune, k)!r})" for k, v in sorted(carried.items())))
    return TunedSettings(result, tuned, {**kept, **carried}, source)


def apply_best_params(params: Params, path: Path, network: str | None = None) -> Params:
    """``params`` with the finetune settings of a ``best_<network>.yaml`` file, validated; pinned keys
    (``tune.pin``) keep their value (see :func:`tuned_settings`)."""
    return tuned_settings(params, path, network).params


def _pinned_values(params: Params) -> dict[str, Any]:
    """The pinned keys of the search space and the values they keep, as ``finetune.<key>: value``."""
    return {f"finetune.{k}": getattr(params.finetune, k) for k in params.tune.space if k in params.tune.pinned}


def tuning_origin(path: Path) -> dict[str, Any]:
    """What a fine-tuning records about the best-settings file it took tuned values from (its lineage.json)."""
    return {"file": str(path), **read_best_params(path)}


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
        "pinned": _pinned_values(params),
    }
    return _write_best_doc(doc, network, out_dir, f"study {study.study_name}")


def _write_best_doc(doc: dict[str, Any], network: str, out_dir: Path, origin: str) -> Path:
    header = (
        f"# Best fine-tuning settings of the {network}, found by `cass tune` ({origin}).\n"
        f"# `cass finetune --network {network} --best-params <this file>` applies the finetune: keys over "
        "params.yaml;\n# pinned: the keys tune.pin (or --set) kept out of the search, with the values they keep.\n"
    )
    path = best_params_path(out_dir, network)
    atomic_write_text(path, header + yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# The study's database going away


def _database_failure(exc: BaseException) -> BaseException | None:
    """The database error behind ``exc`` (itself, or in its chain of causes), or None. An error raised
    ``from None`` over a database error (cass's TrackingError over MLflow's own SQLite store being locked)
    is not a failure of the study's database.

    When the database goes away mid-trial, Optuna raises ``StorageInternalError`` ("invalid data in the
    commit") and then, failing to read the trial back, an ``UnboundLocalError``: both are a lost database."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, DisconnectionError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    failure = None
    for current in exception_chain(exc):
        if isinstance(current, DBAPIError | DisconnectionError | PoolTimeout):
            return current  # the driver's own error: the most telling
        if isinstance(current, StorageInternalError) and failure is None:
            failure = current
    return failure


def _database_reason(failure: BaseException) -> str:
    orig = getattr(failure, "orig", None)  # the driver's error inside SQLAlchemy's
    text = str(orig if orig is not None else failure).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact(" ".join(lines[:2]) or type(failure).__name__)


def _database_message(url: str, during: str, failure: BaseException) -> str:
    reason = _database_reason(failure)
    return (
        f"the tuning database {redact(url)} failed during {during}: {reason}"
        f"{'' if reason.endswith(('.', '?', '!')) else '.'} Check that the database server runs and accepts "
        "connections from this machine (the URL comes from "
        f"--storage, ${STORAGE_ENV} or tune.storage), then rerun the same command: the study resumes with "
        "its finished trials, and trials that were running are failed and queued again"
    )


@contextlib.contextmanager
def _study_database(url: str, during: str) -> Iterator[None]:
    """Turn a refused or lost database connection into one :class:`StudyDatabaseError` naming the storage."""
    try:
        yield
    except CassError:  # cass's own errors (a StudyDatabaseError, a TrackingError) say what failed already
        raise
    except Exception as exc:
        failure = _database_failure(exc)
        if failure is None:
            raise
        raise StudyDatabaseError(_database_message(url, during, failure)) from None


@contextlib.contextmanager
def _quiet_heartbeat_failures() -> Iterator[None]:
    """Optuna's heartbeat thread dies with a traceback when the database goes away; the trial's own
    thread meets the same failure and reports it once (as a StudyDatabaseError)."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and _database_failure(args.exc_value) is not None:
            log.debug("heartbeat thread stopped: %s", _database_reason(args.exc_value))
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


# --------------------------------------------------------------------------------------------------
# Study progress: which trials hold a place in the n_trials budget


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


def _counted(trials: Sequence[Any]) -> list[Any]:
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

    states = [t.state for t in _counted(study.get_trials(deepcopy=False))]
    return StudyProgress(
        *(
            states.count(s)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
        )
    )


class _SurplusTrial(Exception):
    """Two workers took the last place of the budget at the same moment; the later trial stands down."""


# --------------------------------------------------------------------------------------------------
# MLflow: one run per study, a nested run per trial. Each is a RunLogger addressed by id (no active-run
# state), so worker processes and Optuna's stale-trial callback log side by side.


@dataclass(frozen=True)
class _Runs:
    """Where a study's runs go, the lineage tags they carry and the data they train on, looked up once per
    worker. Runs are named like the pipeline's (:func:`cass.tracking.label_of`): ``tune-<network> <label>``
    (a pipeline's label when the study runs in one), and each trial after the values it tries."""

    cfg: MlflowConfig
    experiment_id: str
    lineage: Lineage
    data_dir: Path
    label: str

    @classmethod
    def open(cls, params: Params, data_dir: Path, parent_run_id: str | None = None) -> _Runs:
        from cass.lineage import data_version, git_commit

        experiment_id = configure(params.mlflow)  # checks a server answers before any trial
        data = params.data
        lineage = Lineage(data.name, params.finetune.label_fraction, git_commit(), data_version(data.root))
        label = label_of(params, data_dir, lineage.data_version, parent_run_id=parent_run_id)
        return cls(params.mlflow, experiment_id, lineage, Path(data_dir), label)

    def _dataset(self, run: RunLogger, params: Params) -> None:
        digest = data_digest(self.data_dir, self.lineage.data_version)
        run.dataset(self.data_dir, params.data.name, digest, "training")

    def study(self, params: Params, network: str, name: str, url: str) -> RunLogger:
        tags = run_tags(self.lineage.tags(network, stage="tune", study=name, storage=redact(url)))
        run = RunLogger.create(self.cfg, self.experiment_id, run_name(f"tune-{network}", self.label), tags)
        run.params(params)
        self._dataset(run, params)
        return run

    def trial(
        self, parent: str, trial: optuna.Trial, network: str, settings: Params, retry_of: int | None, base: Params
    ) -> RunLogger:
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


def _end_trial(run: RunLogger, state: str, objective: str, value: float | None) -> None:
    """Record how the trial ended (``trial_state``: complete, pruned, failed, interrupted) and its best value."""
    run.tags({"trial_state": state})
    if value is not None:
        run.metrics({f"best_{objective}": value})
    run.finish({"failed": "FAILED", "interrupted": "KILLED"}.get(state, "FINISHED"))


# --------------------------------------------------------------------------------------------------
# The study


class _OnStaleTrial:
    """Called by the live worker that finds a trial whose worker stopped beating: the trial is already
    failed by Optuna; mark its MLflow run failed too and queue the same settings again."""

    def __init__(self, max_retry: int, cfg: MlflowConfig) -> None:
        self.storage_kwarg, self._retry = _retry_callback(max_retry)
        self._max_retry = max_retry
        self._cfg = cfg

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retried = len(trial.system_attrs.get("retry_history", []))
        again = "queued again" if retried < self._max_retry else f"not queued again (retried {retried} times)"
        log.warning("trial %d of %s: its worker stopped beating; failed, %s", trial.number, study.study_name, again)
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            try:
                _end_trial(RunLogger(self._cfg, run_id), "failed", "", None)
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
class _OpenStudy:
    study: optuna.Study
    runs: _Runs
    parent_run_id: str
    url: str


def _open_study(params: Params, network: str, url: str, worker_index: int, data_dir: Path,
                parent_run_id: str | None = None) -> _OpenStudy:
    """Create or join the network's study; refuse one whose trials were run with other settings."""
    runs = _Runs.open(params, data_dir, parent_run_id)
    with _study_database(url, f"opening study '{study_name(params.tune, network)}'"):
        return _join_study(params, network, url, worker_index, runs)


def _join_study(params: Params, network: str, url: str, worker_index: int, runs: _Runs) -> _OpenStudy:
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
    on_stale = _OnStaleTrial(cfg.max_retry, params.mlflow)
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
        raise  # the server refused or did not answer: a StudyDatabaseError (_study_database)
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
        study.set_user_attr(PARENT_RUN_ATTR, parent)
    return _OpenStudy(study, runs, parent, url)


def _suggest(trial: optuna.Trial, name: str, spec: FloatSpec | IntSpec | CategoricalSpec) -> Any:
    if isinstance(spec, CategoricalSpec):
        return trial.suggest_categorical(name, list(spec.choices))
    if isinstance(spec, IntSpec):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


class _Objective:
    """One trial: sample settings, fine-tune in a scratch folder, report and maybe prune per epoch."""

    def __init__(
        self,
        params: Params,
        data_dir: Path,
        network: Network,
        out_dir: Path,
        pretrain_dir: Path | None,
        opened: _OpenStudy,
        callbacks: Sequence[EpochCallback],
    ) -> None:
        self.params, self.data_dir, self.network, self.pretrain_dir = params, data_dir, network, pretrain_dir
        self.trials_dir = Path(out_dir) / "trials" / network
        self.opened, self.callbacks = opened, callbacks

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        cfg = self.params.tune
        counted = _counted(trial.study.get_trials(deepcopy=False))
        if sum(t.number < trial.number for t in counted) >= cfg.n_trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise _SurplusTrial(f"the study already has its {cfg.n_trials} trials; this one does not run")
        frozen = next((t for t in counted if t.number == trial.number), None)
        retry_of = frozen.system_attrs.get("failed_trial") if frozen is not None else None

        values = {name: _suggest(trial, name, spec) for name, spec in cfg.searched.items()}
        fixed = {} if cfg.epochs is None else {"epochs": cfg.epochs}
        settings = trial_params(self.params, {**values, **fixed}, f"tune trial {trial.number}")
        run = self.opened.runs.trial(self.opened.parent_run_id, trial, self.network, settings, retry_of, self.params)
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
                  system_metrics(self.opened.runs.cfg, run.run_id)):
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
            state = "interrupted"  # stopped by the user: not a result, so it does not count (see _counted)
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        finally:
            _end_trial(run, state, cfg.objective, value)


def _work(opened: _OpenStudy, objective: _Objective, cfg: TuneConfig) -> int:
    """Run trials until the study has ``n_trials`` finished ones (or the timeout); returns trials run.

    A worker that finds the last trials running elsewhere waits for them instead of leaving: if their
    worker dies, the trial is queued again and someone must be there to run it."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    study = opened.study
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    poll = max(1.0, min(cfg.heartbeat_interval / 2, 10.0))
    ran = 0
    with _study_database(opened.url, f"study '{study.study_name}'"), _quiet_heartbeat_failures():
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
            study.optimize(objective, n_trials=1, catch=(TrainingError, _SurplusTrial), gc_after_trial=True)
            ran += 1
    return ran


def run_worker(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None,
    storage: str,
    worker_index: int = 0,
    callbacks: Sequence[EpochCallback] = (),
) -> int:
    """Join the network's study in ``storage`` and run trials until it has ``tune.n_trials``.

    ``worker_index`` offsets the sampler seed, so that workers started together do not draw the same
    random start-up points. Returns the number of trials this worker ran."""
    if not params.tune.searched:
        log.info("every key of tune.space is pinned: %s has nothing to search", study_name(params.tune, network))
        return 0
    opened = _open_study(params, network, storage, worker_index, Path(data_dir))
    objective = _Objective(params, Path(data_dir), network, Path(out_dir), pretrain_dir, opened, callbacks)
    ran = _work(opened, objective, params.tune)
    log.info("worker %d ran %d trial(s) of %s", worker_index, ran, opened.study.study_name)
    return ran


def default_worker_index() -> int:
    """A seed offset for a worker started on its own (a pod): differs between hosts and processes."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_003


def route_optuna_logging() -> None:
    """Send Optuna's messages through the ``logging`` setup of this process, at its level."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.getLogger().getEffectiveLevel())


def _worker_process(args: tuple, level: int, threads: int, errors: Any) -> None:
    """A local worker. Its CassError goes to the parent (``errors``), which reports once for all workers."""
    import torch

    from cass.redaction import install_log_redaction

    install_log_redaction()  # a new process: its log lines lose credentials as the parent's do
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    route_optuna_logging()
    torch.set_num_threads(min(threads, torch.get_num_threads()))  # N workers share the cores, not N x all
    try:
        run_worker(*args)
    except CassError as exc:
        errors.put(_WorkerError.of(exc))
        sys.exit(exc.exit_code)


@dataclass(frozen=True)
class _WorkerError:
    """A worker's CassError as it crosses to the parent: its class by name, its exit code and message."""

    module: str
    qualname: str
    exit_code: int
    message: str

    @classmethod
    def of(cls, exc: CassError) -> _WorkerError:
        return cls(type(exc).__module__, type(exc).__qualname__, exc.exit_code, str(exc))

    def error(self) -> CassError:
        """The worker's error, of its own class (or its nearest base made from a message alone, with the same
        exit code); a plain CassError with the worker's exit code if the class cannot be found here."""
        import importlib

        kind: Any = None
        with contextlib.suppress(Exception):  # the plain CassError below says the same to the user
            kind = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                kind = getattr(kind, part)
        for cls in kind.__mro__ if isinstance(kind, type) and issubclass(kind, CassError) else ():
            if issubclass(cls, CassError) and cls.exit_code == self.exit_code:
                with contextlib.suppress(Exception):
                    return cls(self.message)
        exc = CassError(self.message)
        exc.exit_code = self.exit_code
        return exc


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _after_workers(params: Params, network: str, url: str, failed: Sequence[str],
                   errors: Sequence[_WorkerError], workers: int) -> None:
    """Judge local workers of which some failed by the study they leave: finished -> a warning (the
    others ran the dead worker's trials); unfinished -> one error (a database failure first)."""
    import optuna
    from sqlalchemy.pool import NullPool

    cfg = params.tune
    name = study_name(cfg, network)
    finished = 0
    with _study_database(url, f"study '{name}'"), contextlib.suppress(KeyError):  # KeyError: no study yet
        storage = optuna.storages.RDBStorage(database_url(url), engine_kwargs={"poolclass": NullPool})
        finished = study_progress(optuna.load_study(study_name=name, storage=storage)).finished
    if finished >= cfg.n_trials:
        log.warning("%d of %d tuning workers stopped (%s); the others finished the study's %d trials",
                    len(failed), workers, "; ".join(failed), cfg.n_trials)
        return
    for error in sorted(errors, key=lambda e: e.exit_code != StudyDatabaseError.exit_code):
        raise error.error()  # the workers' own error, with its exit code
    raise TrainingError(
        f"{len(failed)} of {workers} tuning workers failed ({'; '.join(failed)}) and the study has "
        f"{finished} of its {cfg.n_trials} trials; see their log, then rerun the same command to resume it"
    )


def work(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None = None,
    *,
    workers: int = 1,
    storage: str | None = None,
    worker_index: int = 0,
    callbacks: Sequence[EpochCallback] = (),
) -> None:
    """Run the study's trials in this process (``workers=1``) or in ``workers`` new processes."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    url = resolve_storage(params, out_dir, network, storage)
    if workers == 1:
        run_worker(params, data_dir, network, out_dir, pretrain_dir, url, worker_index, callbacks)
        return
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch threads and open database handles
    level = logging.getLogger().getEffectiveLevel()
    threads = max(1, (os.cpu_count() or 1) // workers)
    errors = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_worker_process,
            args=((params, data_dir, network, out_dir, pretrain_dir, url, worker_index + i, callbacks), level, threads,
                  errors),
            name=f"tune-{network}-{i}",
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:  # interrupted: give the workers a moment to fail their trials, then stop them
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    failed = [f"{p.name}: {_exit_reason(p.exitcode)}" for p in procs if p.exitcode != 0]
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if failed:
        _after_workers(params, network, url, failed, reported, workers)


def tune(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None = None,
    *,
    workers: int = 1,
    storage: str | None = None,
    callbacks: Sequence[EpochCallback] = (),
    parent_run_id: str | None = None,
) -> Path:
    """Search the fine-tuning settings of ``network``; returns the best-parameters file.

    Creates (or resumes) the study ``<tune.study_name>-<network>``, runs its trials with ``workers``
    processes here (other machines may join with :func:`run_worker`), then writes
    ``<out_dir>/best_<network>.yaml`` from the best complete trial. ``parent_run_id``: the MLflow run
    (a pipeline's) that the study's run is nested under."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    if not params.tune.searched:
        return _nothing_to_search(params, network, Path(out_dir))
    url = resolve_storage(params, out_dir, network, storage)
    opened = _open_study(params, network, url, 0, Path(data_dir), parent_run_id)
    if parent_run_id:
        RunLogger(params.mlflow, opened.parent_run_id).tags({"mlflow.parentRunId": parent_run_id})
    pinned = _pinned_values(params)
    log.info(
        "tuning %s: study %s in %s, %d trials over %s%s", network, opened.study.study_name, redact(url),
        params.tune.n_trials, ", ".join(params.tune.searched),
        f"; pinned: {', '.join(f'{k}={v!r}' for k, v in pinned.items())}" if pinned else "",
    )
    status, best_file, failure = "FAILED", None, None
    try:
        if workers == 1:  # the study is open already: run it here
            objective = _Objective(params, Path(data_dir), network, Path(out_dir), pretrain_dir, opened, callbacks)
            _work(opened, objective, params.tune)
        else:
            work(params, data_dir, network, out_dir, pretrain_dir, workers=workers, storage=url, callbacks=callbacks)
        with _study_database(url, f"study '{opened.study.study_name}'"):
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
            log.warning("could not close the study's MLflow run %s: %s", opened.parent_run_id, exc)
    return best_file


def _nothing_to_search(params: Params, network: str, out_dir: Path) -> Path:
    """Every key of tune.space is pinned: no study; the best-parameters file says so and holds no tuned value,
    only the pinned ones (``pinned:``), which a fine-tune with other settings takes (:func:`tuned_settings`)."""
    pinned = _pinned_values(params)
    log.warning("tuning %s: every key of tune.space is pinned (%s); no trial runs, and fine-tuning uses the "
                "settings as they are", network, ", ".join(f"{k}={v!r}" for k, v in pinned.items()))
    doc = {"network": network, "objective": params.tune.objective, "finetune": {}, "pinned": pinned}
    return _write_best_doc(doc, network, out_dir, "nothing to search: every key of tune.space is pinned")


def _end_study(opened: _OpenStudy, cfg: TuneConfig, best_file: Path | None, status: str,
               failure: str | None = None) -> None:
    """Close the study's MLflow run with ``status``, even when its database is gone (then without the summary)."""
    run = RunLogger(opened.runs.cfg, opened.parent_run_id)
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
            if _database_failure(exc) is None:
                raise
            log.debug("study run %s closes without its summary: %s", opened.parent_run_id, exc)
        else:
            run.metrics(summary)
        if best_file is not None:
            run.artifact(best_file)
    finally:
        run.finish(status)


def best_params_by_network(files: Sequence[Path], networks: Sequence[str]) -> dict[str, Path]:
    """Match ``--best-params`` files to the networks being fine-tuned, by the network each file names."""
    matched: dict[str, Path] = {}
    for path in map(Path, files):
        network = read_best_params(path).get("network")
        if network is None and len(networks) == 1:
            network = networks[0]
        if network not in networks:
            raise ConfigError(
                f"{path}: holds settings for the {network or 'unnamed network'}, but only "
                f"{', '.join(networks)} is fine-tuned; pass --network {network} or another file"
            )
        if network in matched:
            raise ConfigError(f"{path} and {matched[network]} both hold settings for the {network}; pass one")
        matched[network] = path
    return matched
