"""A deployment of prefect.yaml run the way production runs it: a Prefect API server on a loopback port (the
session's), `prefect deploy`, a process worker polling the pool, and an on-demand run of the tiny demo. The flow
run's log, read back from the Prefect API, must hold the library's lines (epochs, gate messages), as
an in-process run's does, each once; the flow run is named after what sets it apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import LENIENT_MODEL_GATE, stop_group, tiny_mapping

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENT = "cass-retrain/retrain-on-demand"


@pytest.fixture(scope="module")
def prefect_server(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The session's Prefect server (conftest: the API server `prefect server start` runs, on a loopback port,
    with its own database), and the environment of a process that talks to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CASS_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return SimpleNamespace(api=prefect_api, env=env, home=home)


def _flow_run_logs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs, offset = [], 0
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                offset=offset)
        logs += page
        if len(page) < 200:
            return logs
        offset += 200


@pytest.fixture(scope="module")
def worker_run(prefect_server, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The on-demand deployment of prefect.yaml, run by a process worker on the tiny demo (tracked in a
    local MLflow store); the flow run, its logs and the wall time from the request to its end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("worker-run")
    mapping = tiny_mapping(demo_root)
    mapping["mlflow"] = {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlruns"),
                         "experiment": "cass-worker", "model_prefix": "cass-worker"}
    mapping["quality"] = LENIENT_MODEL_GATE
    mapping["pretrain"]["collapse_warn_fraction"] = 1.0  # the tiny networks always "collapse": the warning shows
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    # The worker asks the pool for runs every second (Prefect's default: 10 s, an idle wait of up to 10 s here).
    env = {**prefect_server.env, "CASS_PROJECT_DIR": str(ROOT), "PYTHONPATH": str(ROOT),
           "PREFECT_WORKER_QUERY_SECONDS": "1"}

    with temporary_settings({PREFECT_API_URL: prefect_server.api}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="cass-process", type="process"), overwrite=True)
        deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--name", "retrain-on-demand"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        worker_log = root / "worker.log"
        with open(worker_log, "w") as out:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cass-process", "--name", "test-worker"],
                                      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            started = time.monotonic()
            flow_run: FlowRun = run_deployment(
                DEPLOYMENT, timeout=0,
                parameters={"params_file": str(params_file), "outputs": str(root / "outputs"), "tune_trials": 0,
                            "overrides": ["finetune.lr=0.0005"]},
            )
            deadline = started + 1200
            with get_client(sync_client=True) as client:
                while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
                    assert time.monotonic() < deadline, f"flow run still {flow_run.state.name}: " + \
                        worker_log.read_text()[-3000:]
                    assert worker.poll() is None, worker_log.read_text()[-3000:]
                    time.sleep(0.5)
                wall = time.monotonic() - started
                time.sleep(3)  # the API log handler ships its last batch
                logs = _flow_run_logs(client, flow_run.id)
        finally:
            stop_group(worker)
    yield SimpleNamespace(flow_run=flow_run, logs=logs, wall=wall, worker_log=worker_log, root=root)


def test_worker_run_of_a_deployment_logs_the_library_lines_once(worker_run) -> None:
    run = worker_run
    assert run.flow_run.state.is_completed(), run.flow_run.state.message + run.worker_log.read_text()[-3000:]
    messages = [(log.name, log.message) for log in run.logs]
    library = [(name, message) for name, message in messages if name.startswith("cass.")]
    print(f"\ndeployment run by a process worker: {run.wall:.0f} s from the request to its end; "
          f"{len(run.logs)} log lines, {len(library)} of them cass.*")
    text = "\n".join(message for _, message in library)
    assert "pretrain epoch 1/1" in text, text  # the epochs of each stage, with their total
    assert "finetune cnn epoch 1/2" in text and "finetune vit epoch 2/2" in text, text
    assert "manifest gate passed" in text and "splits gate passed" in text and "model gate passed" in text, text
    assert "cnn: test macro F1" in text, text
    # Each line once: a second handler on the way (the console's, another API handler) would double it.
    assert len(library) == len(set(library)), [m for m in library if library.count(m) > 1]
    assert sum("possible collapse" in message for _, message in library) == 1, text


def test_worker_run_is_named_after_what_sets_it_apart(worker_run) -> None:
    name = worker_run.flow_run.name
    assert name.startswith("retrain demo@untracked lf=1 finetune.lr=0.0005 "), name
