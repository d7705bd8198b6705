"""Stage ``tune``: an Optuna search over fine-tuning settings, from one process to many workers.

Each trial fine-tunes one network with settings drawn from ``tune.space`` and reports the validation
objective after every epoch, so the pruner can stop trials that trail the others at the same epoch.
Workers share a study through its storage: a SQLite file by default, PostgreSQL for several machines.
A running trial beats a heartbeat; when a worker dies, the next worker to look fails its trial and
queues it again. ``n_trials`` counts finished trials over all workers, so a study interrupted or spread
over pods ends with the same number of trials. The best settings go to ``best_<network>.yaml``, which
``cass finetune --best-params`` applies over ``params.yaml`` (and DVC declares as a dependency).

MLflow: one parent run per study, one child run per trial (sampled settings, per-epoch metrics, final
state ``complete``/``pruned``/``failed``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Mapping, Sequence
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
from cass.errors import CassError, ConfigError, TrainingError
from cass.finetune import finetune
from cass.io import atomic_write_text
from cass.layout import best_params_path, optuna_storage_file
from cass.tracking import Lineage, RunLogger, configure, redact, run_tags
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


def apply_best_params(params: Params, path: Path, network: str | None = None) -> Params:
    """``params`` with the finetune settings of a ``best_<network>.yaml`` file, validated."""
    doc = read_best_params(path)
    if network is not None and doc.get("network") not in (None, network):
        raise ConfigError(f"{path}: holds the best settings of the {doc['network']}, not of the {network}")
    return trial_params(params, doc["finetune"], f"{path} (best parameters over the settings)")


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
        "finetune": {name: best.params[name] for name in cfg.space if name in best.params},
    }
    header = (
        f"# Best fine-tuning settings of the {network}, found by `cass tune` (study {study.study_name}).\n"
        f"# `cass finetune --network {network} --best-params <this file>` applies the finetune: keys over "
        "params.yaml.\n"
    )
    path = best_params_path(out_dir, network)
    atomic_write_text(path, header + yaml.safe_dump(doc, sort_keys=False))
    return path


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
    """Where a study's runs go and the lineage tags they carry, looked up once per worker."""

    cfg: MlflowConfig
    experiment_id: str
    lineage: Lineage

    @classmethod
    def open(cls, params: Params) -> _Runs:
        from cass.lineage import data_version, git_commit

        experiment_id = configure(params.mlflow)  # checks a server answers before any trial
        data = params.data
        return cls(params.mlflow, experiment_id,
                   Lineage(data.name, params.finetune.label_fraction, git_commit(), data_version(data.root)))

    def study(self, params: Params, network: str, name: str, url: str) -> RunLogger:
        tags = run_tags(self.lineage.tags(network, stage="tune", study=name, storage=redact(url)))
        run = RunLogger.create(self.cfg, self.experiment_id, f"tune-{name}", tags)
        run.params(params)
        return run

    def trial(
        self, parent: str, trial: optuna.Trial, network: str, settings: Params, retry_of: int | None
    ) -> RunLogger:
        tags = self.lineage.tags(
            network,
            stage="tune-trial",
            study=trial.study.study_name,
            trial=str(trial.number),
            worker=f"{socket.gethostname()}:{os.getpid()}",
            retry_of=None if retry_of is None else str(retry_of),
        )
        run = RunLogger.create(self.cfg, self.experiment_id, f"{network}-trial-{trial.number}", tags, parent)
        run.params(settings)
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


def _open_study(params: Params, network: str, url: str, worker_index: int) -> _OpenStudy:
    """Create or join the network's study; refuse one whose trials were run with other settings."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    cfg = params.tune
    name = study_name(cfg, network)
    runs = _Runs.open(params)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
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
    return _OpenStudy(study, runs, parent)


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

        values = {name: _suggest(trial, name, spec) for name, spec in cfg.space.items()}
        fixed = {} if cfg.epochs is None else {"epochs": cfg.epochs}
        settings = trial_params(self.params, {**values, **fixed}, f"tune trial {trial.number}")
        run = self.opened.runs.trial(self.opened.parent_run_id, trial, self.network, settings, retry_of)
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
            with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-", dir=self.trials_dir) as tmp:
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
    opened = _open_study(params, network, storage, worker_index)
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


def _worker_process(args: tuple, level: int, threads: int) -> None:
    import torch

    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    route_optuna_logging()
    torch.set_num_threads(min(threads, torch.get_num_threads()))  # N workers share the cores, not N x all
    try:
        run_worker(*args)
    except CassError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)


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
    procs = [
        ctx.Process(
            target=_worker_process,
            args=((params, data_dir, network, out_dir, pretrain_dir, url, worker_index + i, callbacks), level, threads),
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
    failed = [f"{p.name}: exit code {p.exitcode}" for p in procs if p.exitcode != 0]
    if failed:
        raise TrainingError(f"{len(failed)} of {workers} tuning workers failed ({'; '.join(failed)}); see their log")


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
    url = resolve_storage(params, out_dir, network, storage)
    opened = _open_study(params, network, url, worker_index=0)
    if parent_run_id:
        RunLogger(params.mlflow, opened.parent_run_id).tags({"mlflow.parentRunId": parent_run_id})
    log.info(
        "tuning %s: study %s in %s, %d trials", network, opened.study.study_name, redact(url), params.tune.n_trials
    )
    status, best_file = "FAILED", None
    try:
        if workers == 1:  # the study is open already: run it here
            objective = _Objective(params, Path(data_dir), network, Path(out_dir), pretrain_dir, opened, callbacks)
            _work(opened, objective, params.tune)
        else:
            work(params, data_dir, network, out_dir, pretrain_dir, workers=workers, storage=url, callbacks=callbacks)
        best_file = write_best_params(opened.study, params, network, Path(out_dir))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            _end_study(opened, params.tune, best_file, status)
        except Exception as exc:  # never hide the error that ended the study
            log.warning("could not close the study's MLflow run %s: %s", opened.parent_run_id, exc)
    return best_file


def _end_study(opened: _OpenStudy, cfg: TuneConfig, best_file: Path | None, status: str) -> None:
    progress = study_progress(opened.study)
    summary: dict[str, float] = {
        "trials_complete": progress.complete,
        "trials_pruned": progress.pruned,
        "trials_failed": progress.failed,
    }
    if progress.complete:
        summary[f"best_{cfg.objective}"] = opened.study.best_value
        summary["best_trial"] = opened.study.best_trial.number
    run = RunLogger(opened.runs.cfg, opened.parent_run_id)
    run.metrics(summary)
    if best_file is not None:
        run.artifact(best_file)
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
