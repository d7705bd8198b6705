"""A prediction job sharded over the work pool, as production runs it: `prefect server start`, the
`predict-shard` deployment of prefect.yaml, two process workers that take one flow run at a time, and the
`cass-predict` flow that splits the job, waits for both shards and merges them into one Parquet file."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import stop_group
from test_flow_worker import PREFECT, ROOT, prefect_server  # noqa: F401  (the server fixture)
from test_predict import CLASSES, _classifier

pytestmark = pytest.mark.slow


def test_a_job_sharded_over_two_process_workers_merges_into_one_output(prefect_server, demo_root: Path,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.predict import predict_sharded

    model = _classifier(tmp_path / "model", "test_resnet", 1.0)
    images = sorted(str(p) for p in demo_root.rglob("*.png"))[:24]
    listed = tmp_path / "scans.csv"
    pd.DataFrame({"path": [*images[:11], str(tmp_path / "gone.png"), *images[11:]]}).to_csv(listed, index=False)
    output = tmp_path / "predictions.parquet"
    # Workers poll every second: a shard's run (a Python process loading torch) outlasts a poll, so with
    # `--limit 1` the second shard goes to the idle worker.
    env = {**prefect_server.env, "CASS_PROJECT_DIR": str(ROOT), "PYTHONPATH": str(ROOT),
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with temporary_settings({PREFECT_API_URL: prefect_server.api}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="cass-process", type="process"), overwrite=True)
        deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--name", "predict-shard"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        workers, logs = [], []
        for n in (1, 2):
            logs.append(tmp_path / f"worker-{n}.log")
            with open(logs[-1], "w") as out:
                workers.append(subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", "cass-process", "--name", f"predict-worker-{n}",
                     "--limit", "1"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True))
        try:
            # Both workers poll the pool before the job is submitted, so neither finds both shards waiting.
            deadline = time.monotonic() + 180
            while not all("started!" in log.read_text() for log in logs) and time.monotonic() < deadline:
                time.sleep(0.5)
            result = predict_sharded(model=str(model), output=str(output), csv=str(listed), shards=2,
                                     batch_size=4, workers=1, chunk_size=5, timeout_s=900)
            with get_client(sync_client=True) as client:
                shard_runs = [r for r in client.read_flow_runs() if r.name.startswith("predict shard ")]
        finally:
            for worker in workers:
                stop_group(worker)

    assert result == {"output": str(output), "predicted": 24, "skipped": 1}
    table = pd.read_parquet(output)
    assert table["path"].tolist() == images  # one output, in input order, the missing file left out
    assert set(table["prediction"]) <= set(CLASSES) and (table["model_uri"] == str(model)).all()
    skipped = pd.read_csv(tmp_path / "predictions.skipped.csv")
    assert skipped["path"].tolist() == [str(tmp_path / "gone.png")] and "file not found" in skipped["problem"][0]
    assert not (tmp_path / "predictions.parquet.shards").exists()
    assert sorted(r.name for r in shard_runs) == ["predict shard 1/2", "predict shard 2/2"]
    assert all(r.state.is_completed() for r in shard_runs)
    # Each worker (one flow run at a time) ran one shard: the job was spread over the pool. Both workers may
    # try to claim a run; the one that loses the race logs "Aborted submission" for it and does not run it.
    def claimed(log: Path, run_id: str) -> bool:
        text = log.read_text()
        return f"submitting flow run '{run_id}'" in text and f"Aborted submission of flow run '{run_id}'" not in text

    ran = [[str(r.id) for r in shard_runs if claimed(log, str(r.id))] for log in logs]
    assert sorted(len(ids) for ids in ran) == [1, 1] and set(ran[0]) != set(ran[1]), [log.read_text()[-2000:]
                                                                                     for log in logs]
