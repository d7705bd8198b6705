"""Running a study's trials: in this process, or in worker processes that share the study through its storage.

:func:`run_trials` is the one way trials run: ``workers=1`` here, else that many new processes; a worker on
another machine or pod runs it with its own ``worker_index``. A worker that dies is replaced by the others
(its trial is queued again), and the result is judged by the study, not by the workers' exit codes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cass.config import Network, Params
from cass.errors import CassError, ConfigError, StudyDatabaseError, TrainingError
from cass.tracker import NO_TRACKER, Tracker
from cass.training import EpochCallback
from cass.tuning.storage import database_url, resolve_storage, study_database
from cass.tuning.study import Objective, open_study, study_name, study_progress, trial_loop

log = logging.getLogger(__name__)


def _run_here(
    params: Params,
    data_dir: Path,
    network: Network,
    out_dir: Path,
    pretrain_dir: Path | None,
    storage: str,
    worker_index: int = 0,
    callbacks: Sequence[EpochCallback] = (),
    tracker: Tracker = NO_TRACKER,
) -> int:
    """Join the network's study in ``storage`` and run trials until it has ``tune.n_trials``.

    ``worker_index`` offsets the sampler seed, so that workers started together do not draw the same
    random start-up points. Returns the number of trials this worker ran."""
    if not params.tune.searched:
        log.info("every key of tune.space is pinned: %s has nothing to search", study_name(params.tune, network))
        return 0
    opened = open_study(params, network, storage, worker_index, Path(data_dir), tracker)
    objective = Objective(params, Path(data_dir), network, Path(out_dir), pretrain_dir, opened, callbacks)
    ran = trial_loop(opened, objective, params.tune)
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
        _run_here(*args)
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
    with study_database(url, f"study '{name}'"), contextlib.suppress(KeyError):  # KeyError: no study yet
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


def run_trials(
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
    tracker: Tracker = NO_TRACKER,
) -> None:
    """Run the study's trials in this process (``workers=1``) or in ``workers`` new processes, until the study
    has ``tune.n_trials`` finished ones; ``worker_index`` offsets the sampler seed of each (a pod's own, from
    :func:`default_worker_index`). ``tracker`` logs each trial (none with the no-op tracker)."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    url = resolve_storage(params, out_dir, network, storage)
    if workers == 1:
        _run_here(params, data_dir, network, out_dir, pretrain_dir, url, worker_index, callbacks, tracker)
        return
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch threads and open database handles
    level = logging.getLogger().getEffectiveLevel()
    threads = max(1, (os.cpu_count() or 1) // workers)
    errors = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_worker_process,
            args=((params, data_dir, network, out_dir, pretrain_dir, url, worker_index + i, callbacks, tracker), level,
                  threads, errors),
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
