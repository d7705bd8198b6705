"""Prediction at volume on the work pool: a job split into shards, one flow run per shard on the pool's
workers (the engine that runs retraining: a process pool here, Kubernetes Jobs in production), merged into
one output.

    predict_sharded: resolve and check the inputs -> write one list per shard -> run the `predict-shard`
      deployment once per shard (the pool's workers pick them up) -> wait -> merge -> one CSV/Parquet

Each shard is :func:`cass.predict.predict_to_file` on its list, writing ``<output>.shards/shard-<i>.csv``
with its own resumable parts: rerun the flow after a failure and finished shards are kept, interrupted
ones go on where they stopped. The output's folder must be one every worker reaches (the same machine, or
a shared volume mounted at the same path). What passes between the flow runs is paths, never tensors.

    prefect deploy --name predict-shard --name predict-sharded
    prefect deployment run 'cass-predict/predict-sharded' -p model=models:/cass-demo-cnn@champion \\
        -p csv=/data/scans.csv -p output=/data/predictions.parquet -p shards=4
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from cass.outputs import PredictionOutputs
from cass.predict import Plan, merge_shards, plan, predict_to_file, read_path_list, resolve_inputs, write_shards

SHARD_DEPLOYMENT = "cass-predict-shard/predict-shard"


def _tracking(model: str, params_file: str) -> None:
    """An MLflow model needs the tracking server of the settings; a folder needs nothing."""
    if not Path(model).is_dir():
        from cass.config import load_params
        from cass.tracking import configure_client

        configure_client(load_params(params_file).mlflow)


@flow(name="cass-predict-shard", log_prints=False)
def predict_shard(model: str, inputs_csv: str, output: str, batch_size: int = 64, workers: int | None = None,
                  chunk_size: int = 1024, params_file: str = "params.yaml", lanes: int | None = None) -> dict[str, Any]:
    """One shard: the images listed in ``inputs_csv`` into ``output`` (resumable)."""
    job = plan(model, read_path_list(Path(inputs_csv)), Path(output), batch_size=batch_size, workers=workers,
               chunk_size=chunk_size, lanes=lanes)
    _tracking(model, params_file)
    summary = predict_to_file(job)
    get_run_logger().info("%s; %d skipped", summary.line(), summary.skipped)
    return {"output": str(summary.output), "predicted": summary.predicted, "skipped": summary.skipped}


def _wait(flow_run_ids: list, timeout_s: float) -> list:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in flow_run_ids]
            if all(run.state.is_final() for run in runs):
                return runs
            if time.monotonic() > deadline:
                late = [f"{run.name} ({run.state.name})" for run in runs if not run.state.is_final()]
                raise TimeoutError(f"shard flow runs not finished after {timeout_s:.0f} s: {', '.join(late)}; is a "
                                   "worker polling the pool? Rerun the flow later: finished shards are kept")
            time.sleep(2)


@flow(name="cass-predict")
def predict_sharded(model: str, output: str, inputs: list[str] | None = None, csv: str | None = None,
                    shards: int = 2, batch_size: int = 64, workers: int | None = None, chunk_size: int = 1024,
                    params_file: str = "params.yaml", deployment: str = SHARD_DEPLOYMENT,
                    timeout_s: float = 24 * 3600, lanes: int | None = None) -> dict[str, Any]:
    """Predict files, folders, globs (``inputs``) and a CSV of paths over ``shards`` flow runs of
    ``deployment``; returns the merged output's path and counts."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    plan(model, (), Path(output), batch_size=batch_size, workers=workers, chunk_size=chunk_size,
         lanes=lanes)  # before any listing
    job: Plan = plan(model, resolve_inputs(inputs or [], Path(csv) if csv else None), Path(output),
                     batch_size=batch_size, workers=workers, chunk_size=chunk_size, lanes=lanes)
    lists = write_shards(job, shards)
    out = PredictionOutputs(job.output)
    submitted = []
    for i, listed in enumerate(lists):
        if out.shard_output(i).is_file():  # finished in an earlier run of this flow
            continue
        run = run_deployment(deployment, timeout=0, flow_run_name=f"predict shard {i + 1}/{shards}", parameters={
            "model": model, "inputs_csv": str(listed.resolve()), "output": str(out.shard_output(i).resolve()),
            "batch_size": batch_size, "workers": workers, "chunk_size": chunk_size, "lanes": lanes,
            "params_file": str(Path(params_file).resolve())})
        submitted.append(run.id)
    logger.info("%d images in %d shards: %d shard flow run(s) submitted to %s", len(job.inputs), shards,
                len(submitted), deployment)
    failed = [f"{run.name}: {run.state.message}" for run in _wait(submitted, timeout_s) if not run.state.is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed: {'; '.join(failed)}. Rerun the flow: finished shards "
                           "are kept, interrupted ones resume")
    summary = merge_shards(job, shards)
    logger.info("wrote %d predictions to %s; %d image(s) skipped%s", summary.predicted, summary.output,
                summary.skipped, f", listed in {out.skipped}" if summary.skipped else "")
    return {"output": str(summary.output), "predicted": summary.predicted, "skipped": summary.skipped}
