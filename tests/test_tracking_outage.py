"""The tracking server as users meet it: a real `mlflow server` reached with a URI that carries a
password, by real `cass` processes. No password may reach their console output, and a server that
dies mid-run must stop the run within a bounded time with exit code 6 and one message, keep the
trained weights, and leave no run RUNNING once the server is back."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cass.config import params_from_mapping
from cass.data.prepare import prepare_data
from cass.outputs import FinetuneOutputs, Layout
from tests.conftest import LENIENT_MODEL_GATE, MlflowServer, kill_when_logged, tiny_mapping

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pw-outage-5d1e"
FINETUNE_CNN = "tags.stage = 'finetune' and tags.network = 'cnn'"
EXIT_BOUND_S = 180  # from the crash to the exit; before bounded tracking calls this took ~16 minutes


@pytest.fixture
def server(mlflow_server: MlflowServer) -> MlflowServer:
    """The session's `mlflow server` (conftest), answering; tests keep apart by experiment."""
    return mlflow_server


def _secret_uri(server: MlflowServer) -> str:
    """The server's address with basic-auth credentials, as production URIs carry them."""
    return server.url.replace("http://", f"http://alice:{PASSWORD}@")


def _params_file(folder: Path, data: Path, experiment: str, **finetune: object) -> Path:
    mapping = tiny_mapping(data)
    mapping["mlflow"] = {"experiment": experiment, "model_prefix": f"cass-{experiment}", "artifact_retry_delay_s": 0}
    mapping["finetune"].update(finetune)
    mapping["quality"] = LENIENT_MODEL_GATE
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def _cass(server: MlflowServer, cwd: Path, *args: str) -> subprocess.Popen:
    """`cass ARGS` in its own process, reaching ``server`` through the URI with the password; its stdout and
    stderr go to files in ``cwd`` (read them with :func:`_output`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=_secret_uri(server))
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "cass.cli", *args], cwd=cwd, env=env, text=True,
                                stdout=out, stderr=err)


def _output(cwd: Path) -> tuple[str, str]:
    return (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


def _finish(proc: subprocess.Popen, cwd: Path, timeout: float, when: str = "after it started") -> int:
    """The exit code of ``proc``; the test fails when it still runs ``timeout`` s ``when``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"`cass` still running {timeout:.0f} s {when}; its stderr ends:\n{_output(cwd)[1][-3000:]}")


def _runs(server: MlflowServer, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(server.url)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_no_tracking_password_in_the_console_output_of_cass_tune(server, demo_root: Path, tmp_path: Path) -> None:
    params_file = _params_file(tmp_path, demo_root, "secrets-tune")
    prepare_data(params_from_mapping(yaml.safe_load(params_file.read_text())), Layout(tmp_path / "outputs").data)
    proc = _cass(server, tmp_path, "tune", "--params", str(params_file), "--outputs", str(tmp_path / "outputs"),
                 "--network", "cnn", "--n-trials", "2", "--set", "tune.epochs=1", "--set", "finetune.init=random")
    code = _finish(proc, tmp_path, 900)
    out, err = _output(tmp_path)
    assert code == 0, err[-3000:]
    names = {r.info.run_name.split(" ")[0] for r in _runs(server, "secrets-tune")}
    assert {"cnn-trial-0", "cnn-trial-1"} <= names  # the runs were logged through the URI with the password
    assert PASSWORD not in out + err


@pytest.mark.slow
def test_server_killed_mid_run_exits_6_keeps_the_weights_and_its_runs_end_failed(server, demo_root: Path,
                                                                                  tmp_path: Path) -> None:
    params_file = _params_file(tmp_path, demo_root, "outage", epochs=3, patience=3)
    outputs = tmp_path / "outputs"
    args = ("demo", "--no-flow", "-q", "--params", str(params_file), "--outputs", str(outputs))
    proc = _cass(server, tmp_path, *args)
    # The crash: as soon as the CNN's fine-tuning has logged its first epoch (two more to go).
    killed_at = kill_when_logged(server, "outage", FINETUNE_CNN, "val_loss", lambda: proc.poll() is not None)
    assert killed_at is not None, f"`cass` exited {proc.poll()} before the crash:\n{_output(tmp_path)[1][-3000:]}"
    code = _finish(proc, tmp_path, EXIT_BOUND_S, "after the tracking server died")
    took = time.monotonic() - killed_at
    out, err = _output(tmp_path)

    assert code == 6, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "stopped answering" in errors[0] and f"alice:***@127.0.0.1:{server.port}" in errors[0]
    assert PASSWORD not in out + err
    assert FinetuneOutputs(outputs / "finetune" / "cnn").weights.is_file()  # the training is not lost
    print(f"exit 6 came {took:.0f} s after the crash")

    # The server comes back on the same store; the next run closes what the crash left open, then trains.
    server.start()
    code = _finish(_cass(server, tmp_path, *args, "--set", "finetune.epochs=1"), tmp_path, 1500)
    out, err = _output(tmp_path)
    assert code == 0, err[-3000:]
    assert PASSWORD not in out + err
    runs = _runs(server, "outage")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_stage = {stage: sorted(r.info.status for r in runs if r.data.tags.get("stage") == stage
                              and (stage != "finetune" or r.data.tags.get("network") == "cnn"))
                for stage in ("pipeline", "pretrain", "finetune")}
    assert by_stage["pipeline"] == by_stage["finetune"] == ["FAILED", "FINISHED"]  # the crashed run, then the rerun
    assert set(by_stage["pretrain"]) == {"FINISHED"}


def test_log_records_and_their_tracebacks_lose_the_password_whichever_handler_prints_them() -> None:
    from cass.redaction import install_log_redaction

    install_log_redaction()
    install_log_redaction()  # once is enough; a second call changes nothing
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    try:
        logger.warning("View run at: %s/#/runs/1", f"http://alice:{PASSWORD}@mlflow:5000")
        try:
            raise RuntimeError(f"API request to http://alice:{PASSWORD}@mlflow:5000/api failed")
        except RuntimeError:
            logger.exception("request to %s failed", "the tracking server")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert PASSWORD not in text
    assert "http://alice:***@mlflow:5000/#/runs/1" in text and "RuntimeError: API request to" in text


def test_mlflow_http_client_is_bounded_by_the_settings_unless_its_variables_are_set(monkeypatch) -> None:
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    )

    from cass.tracking.client import apply_http_settings

    for variable in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(variable, raising=False)
    apply_http_settings(params_from_mapping({"mlflow": {"http_timeout_s": 7, "http_retries": 1}}).mlflow)
    assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()) == (7, 1)
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1  # the setting's default, not MLflow's 2
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()  # no "View run ... at http://user:password@..."
    apply_http_settings(params_from_mapping({"mlflow": {"http_timeout_s": 9}}).mlflow)  # another run's settings
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 9
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own choice wins
    apply_http_settings(params_from_mapping({"mlflow": {"http_retries": 5}}).mlflow)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0


def _record_open_runs(cfg, prefix: str, threads: int, each: int) -> None:
    """``threads`` threads that record ``each`` runs apiece into the open-runs file, all at once."""
    import threading

    from cass.tracking.client import record_open_run

    start = threading.Barrier(threads)

    def record(t: int) -> None:
        start.wait()
        for i in range(each):
            record_open_run(cfg, f"{prefix}-{t}-{i}", "FAILED")

    workers = [threading.Thread(target=record, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_runs_recorded_open_at_once_by_threads_and_processes_are_all_kept(tmp_path: Path, monkeypatch) -> None:
    """Parallel fine-tunes (threads) and tuning workers (processes) that lose the server together each
    record their runs; none may drop another's entry."""
    import json
    import multiprocessing

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:1")
    cfg = params_from_mapping({"mlflow": {"open_runs_file": str(tmp_path / "open-runs.json"),
                                          "artifact_location": str(tmp_path / "mlruns")}}).mlflow
    logging.getLogger("cass.tracking.client").setLevel(logging.ERROR)  # one warning per run recorded
    try:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_record_open_runs, args=(cfg, f"p{p}", 6, 8)) for p in range(3)]
        for p in procs:
            p.start()
        _record_open_runs(cfg, "main", 6, 8)
        for p in procs:
            p.join(60)
    finally:
        logging.getLogger("cass.tracking.client").setLevel(logging.NOTSET)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    runs = json.loads((tmp_path / "open-runs.json").read_text())["runs"]
    expected = {f"{prefix}-{t}-{i}" for prefix in ("main", "p0", "p1", "p2") for t in range(6) for i in range(8)}
    assert sorted(r["run_id"] for r in runs) == sorted(expected)
    assert {r["tracking_uri"] for r in runs} == {"http://alice:***@127.0.0.1:1"}

    # Closing the runs of one store leaves the entries of another store, recorded by others, in the file.
    import mlflow

    from cass.tracking import reset_client
    from cass.tracking.client import close_open_runs, configure, record_open_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = configure(cfg)
        client = mlflow.MlflowClient()
        ids = [client.create_run(experiment).info.run_id for _ in range(2)]
        for run_id in ids:
            record_open_run(cfg, run_id, "FAILED")
        close_open_runs(cfg)
        assert [client.get_run(run_id).info.status for run_id in ids] == ["FAILED", "FAILED"]
    finally:
        reset_client()
    runs = json.loads((tmp_path / "open-runs.json").read_text())["runs"]
    assert sorted(r["run_id"] for r in runs) == sorted(expected)
