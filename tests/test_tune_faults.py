"""`cass tune --workers 2` under real faults: a worker killed with SIGKILL mid-trial, and the study's
PostgreSQL database lost mid-study. Real subprocesses, real signals, a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from cass.cli import main
from cass.tuning import PARENT_RUN_ATTR, database_url, study_progress
from tests.conftest import PG_ADMIN_URL, tiny_mapping

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [4, 8]},
}


@pytest.fixture(autouse=True)
def one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny networks train fastest on one thread on a shared machine; the workers inherit the variables."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _project(tmp_path: Path, demo_root: Path, prepared_dir: Path, **tune_settings) -> tuple[Path, Path]:
    """A params file and an outputs folder holding the prepared data."""
    out = tmp_path / "out"
    shutil.copytree(prepared_dir, out / "data")
    raw = tiny_mapping(demo_root)
    raw["finetune"].update(init="random", epochs=5, patience=5)
    raw["mlflow"] = {"artifact_location": str(tmp_path / "mlruns"), "experiment": "tune-faults"}
    # A live worker must not be taken for dead on a busy machine: a grace period of many heartbeats.
    raw["tune"] = {"startup_trials": 2, "space": SPACE, "pruner": {"type": "none"}, "heartbeat_interval": 2,
                   "grace_period": 20, **tune_settings}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return params, out


def _start_tune(params: Path, out: Path, storage: str) -> subprocess.Popen[str]:
    """`cass tune --workers 2` as a user starts it: its own process, its own worker processes."""
    cmd = [sys.executable, "-m", "cass.cli", "tune", "--network", "cnn", "--workers", "2", "--storage", storage,
           "--params", str(params), "--outputs", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def _study(storage: str) -> optuna.Study | None:
    """The study as a reader sees it. One storage per URL, without a pool: polling holds no connection open
    (the PostgreSQL server is shared)."""
    from sqlalchemy.pool import NullPool

    if storage not in _STORAGES:
        _STORAGES[storage] = optuna.storages.RDBStorage(database_url(storage), engine_kwargs={"poolclass": NullPool})
    try:
        return optuna.load_study(study_name="cass-finetune-cnn", storage=_STORAGES[storage])
    except KeyError:  # not created yet
        return None


def _wait_for(storage: str, proc: subprocess.Popen[str], ready, timeout: float = 300.0):
    """Poll the study until ``ready(study)`` returns something (the command must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"cass tune ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}"
        study = _study(storage)
        found = ready(study) if study is not None else None
        if found:
            return found
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for the study: {proc.communicate()[1][-3000:]}")


def _reported_running_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """A trial in the middle of its epochs: running, at least one epoch reported, its worker recorded."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next((t for t in running if t.intermediate_values and "worker" in t.user_attrs), None)


# --------------------------------------------------------------------------------------------------
# A worker killed


@pytest.mark.slow
def test_sigkill_of_one_worker_mid_trial_still_finishes_the_study_with_exit_0(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, postgres_url: str
) -> None:
    params, out = _project(tmp_path, demo_root, prepared_dir, n_trials=4)
    proc = _start_tune(params, out, postgres_url)
    try:
        victim = _wait_for(postgres_url, proc, _reported_running_trial)
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        assert pid != proc.pid  # a worker process, not the command itself
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "killed by SIGKILL" in err  # the operator is told, as a warning
    study = _study(postgres_url)
    assert study is not None
    assert study.trials[victim.number].state == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert study_progress(study).complete == 4
    best = yaml.safe_load((out / "tune" / "best_cnn.yaml").read_text())
    assert best["trial"] == study.best_trial.number
    parent = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED"


# --------------------------------------------------------------------------------------------------
# The database lost mid-study


@contextlib.contextmanager
def _admin() -> Iterator:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def _cut_off(database: str) -> None:
    """The database stops answering the study: new connections are refused and open ones are closed.
    (The shared server keeps running for everyone else; only this test's database goes away.)"""
    with _admin() as cur:
        cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))


def _restore(database: str) -> None:
    with _admin() as cur:
        cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


@pytest.mark.slow
def test_database_lost_mid_study_exits_11_with_one_message_and_fails_the_runs(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, postgres_url: str
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    # A password in the URL (the server trusts loopback, so it is not checked): it must not be printed.
    storage = postgres_url.replace("://postgres@", "://postgres:s3cret-pw@")
    params, out = _project(tmp_path, demo_root, prepared_dir, n_trials=40)
    proc = _start_tune(params, out, storage)
    try:
        def mid_study(study: optuna.Study):
            done = study_progress(study).complete
            trial = _reported_running_trial(study)
            return (study.user_attrs[PARENT_RUN_ATTR], done) if done >= 1 and trial is not None else None

        parent_run_id, _ = _wait_for(storage, proc, mid_study)
        _cut_off(database)
        cut = time.monotonic()
        _, err = proc.communicate(timeout=600)
        stopped_after = time.monotonic() - cut
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _restore(database)

    assert proc.returncode == 11, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    message = errors[0]
    assert "postgres:***@127.0.0.1" in message and database in message
    assert "rerun" in message
    for noise in ("Traceback", "UnboundLocalError", "invalid data in the commit", "s3cret-pw"):
        assert noise not in err, err[-3000:]
    assert stopped_after < 300, f"took {stopped_after:.0f}s to stop after the database went away"
    assert not (out / "tune" / "best_cnn.yaml").exists()

    # MLflow: the study's run and every trial run are closed, none left RUNNING.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FAILED"
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    assert trials and all(r.info.status != "RUNNING" for r in trials), [r.info.status for r in trials]

    # What the message tells the operator to do works: with the database back, the same command resumes.
    study = _study(storage)
    assert study is not None
    finished = study_progress(study).finished
    common = ["tune", "--network", "cnn", "--storage", storage, "--params", str(params), "--outputs", str(out)]
    assert main([*common, "-q", "--n-trials", str(finished + 1)]) == 0
    study = _study(storage)
    assert study_progress(study).finished == finished + 1
    assert (out / "tune" / "best_cnn.yaml").is_file()
    assert study.get_trials(states=(TrialState.RUNNING,)) == []  # the cut-off trials were failed and queued again
    assert client.get_run(study.user_attrs[PARENT_RUN_ATTR]).info.status == "FINISHED"


def test_database_refusing_at_start_exits_11_before_any_trial(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.conftest import free_port

    params, out = _project(tmp_path, demo_root, prepared_dir, n_trials=2)
    storage = f"postgresql://optuna:s3cret-pw@127.0.0.1:{free_port()}/optuna"  # nothing listens there
    code = main(["tune", "--network", "cnn", "--storage", storage, "--params", str(params), "--outputs", str(out)])
    err = capsys.readouterr().err
    assert code == 11, err
    assert "error: the tuning database postgresql://optuna:***@127.0.0.1" in err and "Connection refused" in err
    assert "s3cret-pw" not in err and "Traceback" not in err
    assert not (out / "tune").exists()


# --------------------------------------------------------------------------------------------------
# A tracking failure is not a database failure


def _mlflow_store_locked(tmp_path: Path) -> None:
    """What a trial meets when MLflow's own SQLite store is locked: cass's TrackingError, raised ``from None``
    over MLflow's error over SQLAlchemy's."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    from cass.config import MlflowConfig
    from cass.tracking.client import reaching

    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with reaching(cfg, "logging metrics"):
        try:
            raise OperationalError("INSERT INTO metrics", {}, sqlite3.OperationalError("database is locked"))
        except OperationalError as exc:
            raise MlflowException(f"(sqlite3.OperationalError) {exc.orig}") from exc


def test_a_tracking_failure_during_the_study_stays_a_tracking_error_not_exit_11(tmp_path: Path) -> None:
    import threading

    from cass.tracking.client import TrackingError
    from cass.tuning.storage import database_failure, quiet_heartbeat_failures, study_database

    with pytest.raises(TrackingError) as caught, study_database("sqlite:///optuna.db", "study 'cass-finetune-cnn'"):
        _mlflow_store_locked(tmp_path)
    assert caught.value.exit_code == 6 and "database is locked" in str(caught.value)
    assert database_failure(caught.value) is None

    # A driver error that is the real cause (not hidden by `from None`) is still found.
    from sqlalchemy.exc import OperationalError

    try:
        try:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("Connection refused"))
        except OperationalError:
            raise RuntimeError("could not read the trial back")  # noqa: B904
    except RuntimeError as exc:
        assert isinstance(database_failure(exc), OperationalError)

    # The heartbeat thread's hook lets a tracking failure through to the usual report.
    seen: list[BaseException] = []
    previous, threading.excepthook = threading.excepthook, lambda args: seen.append(args.exc_value)
    try:
        with quiet_heartbeat_failures():
            thread = threading.Thread(target=_mlflow_store_locked, args=(tmp_path,))
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert len(seen) == 1 and isinstance(seen[0], TrackingError)
