"""The runs of a pipeline: one parent run, a child run per stage, and how a run ends.

The parent run of a pipeline is never made active: every stage opens its child run with the parent's id,
because MLflow's active-run stack is per thread and Prefect runs tasks in worker threads. A run that cannot
be ended is recorded and ended at the next start (:func:`~cass.tracking.client.record_open_run`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from cass.config import MlflowConfig, Params
from cass.outputs import INFO_FILE, Layout
from cass.tracking.client import (
    configure,
    reaching,
)
from cass.tracking.runs import RunLogger, end_run
from cass.tracking.tags import (
    RUN_LABEL_TAG,
    changed_settings,
    data_digest,
    label_of,
    networks_tag,
    pipeline_lineage,
    run_label,
    run_name,
    run_tags,
)

# --------------------------------------------------------------------------------------------------
# The runs of a pipeline


@contextlib.contextmanager
def child_run(
    cfg: MlflowConfig, name: str, tags: Mapping[str, str], parent_run_id: str | None = None
) -> Iterator[str]:
    """A nested run, active in this thread for the block; ends FAILED when the block raises (KILLED on Ctrl-C).

    ``parent_run_id`` names the parent explicitly (default: this thread's active run). Stage runs are
    active runs because the model is logged into the active run (:func:`cass.serving.log_classifier`).
    When the block failed, a failure to end the run never hides the block's error.
    """
    import mlflow

    with reaching(cfg, f"starting the run '{name}'"):
        run = mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id, tags=run_tags(tags))
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException as exc:
        with contextlib.suppress(Exception):
            end_run(cfg, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", active=True)
        raise
    end_run(cfg, run_id, "FINISHED", active=True)


def start_pipeline_run(
    params: Params, layout: Layout, *, params_file: Path | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """Create the parent run of a pipeline on prepared data; returns its id.

    It carries the lineage tags, the flat params, params.yaml (redacted) and dataset.json. Uploading them
    proves the artifact store works before any training; a failure ends the run FAILED.
    """
    cfg = params.mlflow
    experiment_id = configure(cfg)
    lineage = pipeline_lineage(params, layout.data)
    digest = data_digest(layout.data, lineage.data_version)
    label = run_label(params, digest, changed_settings(params, _file_settings(params_file)))
    all_tags = run_tags({**lineage.tags(networks_tag(params), stage="pipeline"), RUN_LABEL_TAG: label, **(tags or {})})
    run = RunLogger.create(cfg, experiment_id, label, all_tags)
    try:
        run.params(params)
        run.params_files(params, params_file)
        run.artifact(layout.data / INFO_FILE, "data")
        run.dataset(layout.data, params.data.name, digest, "training")
    except BaseException:
        with contextlib.suppress(Exception):
            end_pipeline_run(params, run.run_id, "FAILED")
        raise
    return run.run_id


def _file_settings(params_file: Path | None) -> Params | None:
    """The settings file as written (no overrides), the base a run's changed settings are measured from;
    None when there is none or it no longer reads."""
    from cass.config import load_params
    from cass.errors import CassError

    if params_file is None or not Path(params_file).is_file():
        return None
    try:
        return load_params(params_file)
    except CassError:
        return None


def end_pipeline_run(
    params: Params, run_id: str, status: str = "FINISHED", tags: Mapping[str, str] | None = None
) -> None:
    """Set the parent run's final tags and status (FINISHED, FAILED or KILLED)."""
    run = RunLogger(params.mlflow, run_id)
    run.tags(tags or {})
    run.finish(status)


@contextlib.contextmanager
def stage_run(
    params: Params, data_dir: Path, parent_run_id: str, stage: str, network: str | None = None, *,
    context: str = "training", **tags: str | None
) -> Iterator[RunLogger]:
    """A child run of ``parent_run_id`` for one stage, with the lineage tags, the flat params and the
    dataset input (``context``); named ``<stage>[-<network>] <the parent's label>``."""
    configure(params.mlflow)
    lineage = pipeline_lineage(params, data_dir)
    label = label_of(params, data_dir, lineage.data_version, parent_run_id=parent_run_id)
    name = run_name(f"{stage}-{network}" if network else stage, label)
    with child_run(params.mlflow, name, lineage.tags(network or networks_tag(params), stage=stage, **tags),
                   parent_run_id) as run_id:
        run = RunLogger(params.mlflow, run_id)
        run.params(params)
        run.dataset(data_dir, params.data.name, data_digest(data_dir, lineage.data_version), context)
        yield run
