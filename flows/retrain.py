"""The retraining flow: the stages of :mod:`cass.pipeline`, each a Prefect task.

    check MLflow -> [dvc pull] -> prepare -> nothing changed? -> data gate -> pretrain -> [tune] ->
      fine-tune -> evaluate -> model gate -> register -> promote

The stage list, what each stage calls and the order live in :data:`cass.pipeline.STAGES`; this module
only says how a stage runs as a task: I/O stages (MLflow, S3, ``dvc pull``) are retried with the delays
of the ``retrain:`` settings, training stages never; the fine-tunings run side by side on a GPU; one
retraining at a time holds the global concurrency limit. It also publishes what the run tells its users
as Prefect artifacts (:mod:`flows.report`): the summary, and a table of the failed checks when a gate
fails. A failed data gate stops the run before training. A failed model gate, with the default
``quality.model_gate_policy: per_network``, skips the networks that failed, registers and promotes those
that passed, then fails the run; with ``all``, or when no network passed, nothing is registered or promoted.

A run whose data and result-changing settings equal those of a completed run trains nothing
(:mod:`cass.run_keys`); a run that changes only fine-tuning settings reuses the pretraining.

Wherever the flow runs (this process, a worker's subprocess, a Kubernetes Job), the library's log lines
(epochs, progress, gate messages) go to the flow run's log (:func:`library_logs_to_the_run_log`), and a
flow run is named by what sets it apart (:func:`run_name`), as its MLflow runs are.

    prefect deploy --all                                   # the deployments of prefect.yaml
    prefect deployment run 'cass-retrain/retrain-on-demand' -p label_fraction=0.1
    python -m flows.retrain --set finetune.epochs=5        # one run here, without a deployment
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cass import tracking
from cass.config import Network, Params, RetrainConfig, load_params
from cass.errors import CassError, ConfigError, DataError, GateFailed
from cass.outputs import Layout
from cass.pipeline import STAGES, Execute, ModelGateFailed, PipelineRun, Stage, call, gate_failure, run_stages
from cass.redaction import install_log_redaction
from cass.run_keys import data_hash
from cass.stages import tunes
from flows.notify import notify_failed, notify_refused
from flows.report import METRICS, MlflowLinks, RunSummary, gate_table, summary_markdown, unchanged_markdown

LIBRARY_LOGGER = "cass"
FLOW_NAME = "cass-retrain"
SUMMARY_KEY = "retrain-summary"
DATA_GATE_KEY = "data-quality-gate"
MODEL_GATE_KEY = "model-gate"


def _transient(task, task_run, state) -> bool:
    """Retry condition of the I/O tasks: a wrong setting or a failed gate does not heal by waiting."""
    return not isinstance(state.data, ConfigError | GateFailed | DataError)


def io_options(cfg: RetrainConfig) -> dict[str, Any]:
    """Retries of an I/O task: ``io_retries`` attempts after the first, delays doubling from ``io_retry_delay_s``."""
    delays = [min(cfg.io_retry_delay_s * 2**i, cfg.io_retry_max_delay_s) for i in range(cfg.io_retries)]
    return {"retries": cfg.io_retries, "retry_delay_seconds": delays or 0, "retry_condition_fn": _transient}


# --------------------------------------------------------------------------------------------------
# Settings of one run


def flow_params(
    params_file: str,
    overrides: Sequence[str] = (),
    *,
    dataset: str | None = None,
    label_fraction: float | None = None,
    pretrain_epochs: int | None = None,
    tune_trials: int | None = None,
) -> Params:
    """params.yaml with ``overrides``, then the deployment's parameters on top (validated like the file).

    ``dataset``: a name under data/ (``data.name=NAME``, ``data.root=data/NAME``) or a folder path.
    A ``label_fraction`` missing from ``split.label_fractions`` is added there, so its subset is written.
    """
    extra = list(overrides)
    if dataset:
        root = Path(dataset) if "/" in dataset else Path("data") / dataset
        extra += [f"data.name={root.name}", f"data.root={root.as_posix()}"]
    if label_fraction is not None:
        fractions = list(load_params(params_file, extra).split.label_fractions)
        if label_fraction not in fractions:
            extra.append(f"split.label_fractions={json.dumps([*fractions, label_fraction])}")
        extra.append(f"finetune.label_fraction={label_fraction}")
    if pretrain_epochs is not None:
        extra.append(f"pretrain.epochs={pretrain_epochs}")
    if tune_trials:
        extra.append(f"tune.n_trials={tune_trials}")
    return load_params(params_file, extra)


def run_name() -> str:
    """The flow run's name, from its parameters: ``retrain <dataset>@<data version> lf=<fraction>
    <changed settings> <time>`` (:func:`cass.tracking.run_label`), instead of Prefect's random one."""
    from datetime import datetime

    from prefect.runtime import flow_run

    from cass.errors import CassError
    from cass.lineage import data_version

    given = flow_run.parameters
    params_file = given.get("params_file", "params.yaml")
    try:
        params = flow_params(params_file, given.get("overrides") or [], dataset=given.get("dataset"),
                             label_fraction=given.get("label_fraction"), pretrain_epochs=given.get("pretrain_epochs"),
                             tune_trials=given.get("tune_trials"))
        base = load_params(params_file)
    except (CassError, OSError):  # the flow itself reports bad settings, with the key and what to do
        return f"retrain {datetime.now():%m-%d %H:%M}"
    version = given.get("data_version") or data_version(params.data.root)
    return f"retrain {tracking.run_label(params, version, tracking.changed_settings(params, base))}"


def library_logs_to_the_run_log() -> None:
    """Send the library's log lines (``cass.*``: epochs, progress, gate messages) to this flow run's log.

    Prefect gives each logger named in ``PREFECT_LOGGING_EXTRA_LOGGERS`` the handler that ships records to
    its API, but no level. In the process a worker starts for a flow run nothing but Prefect configures
    logging, and Prefect's root level is WARNING: ``cass`` inherited it and dropped every INFO line before
    that handler saw it (a run in this process, where the CLI had set the root level to INFO, showed them).
    Here ``cass`` gets Prefect's own level (``PREFECT_LOGGING_LEVEL``, as ``prefect.extra``) when it would
    otherwise drop more, and the API handler when the deployment's environment did not name it.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        logger.addHandler(APILogHandler())
    level = logging.getLogger("prefect.extra").getEffectiveLevel()
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------
# Each stage a task


def _tracking_errors_told(stage: Stage) -> Callable[..., Any]:
    """``stage.run`` with any MLflow error that escaped it turned into one TrackingError: Prefect logs a failed
    task's exception and keeps it as the state's message, and MLflow's quote the tracking URI, password and all.
    A TrackingError is retried like the error it replaces (:func:`_transient`)."""

    @functools.wraps(stage.run)
    def run(pipeline_run: PipelineRun, network: Network | None) -> Any:
        try:
            return stage.run(pipeline_run, network)
        except CassError:
            raise
        except Exception as exc:
            if not tracking.is_tracking_failure(exc):
                raise
            what = f"running '{stage.label(network)}'"
            raise tracking.tracking_error(pipeline_run.params.mlflow, what, exc) from None

    return run


def stage_tasks(cfg: RetrainConfig) -> dict[str, Task]:
    """One task per stage of :data:`cass.pipeline.STAGES`, named after it (per network: ``fine-tune-cnn``);
    only I/O stages are retried."""
    io = io_options(cfg)
    tasks = {}
    for stage in STAGES:
        options: dict[str, Any] = {"name": stage.name, "cache_policy": NO_CACHE, **(io if stage.io else {})}
        if stage.per_network:
            options["task_run_name"] = f"{stage.name}-{{network}}"
        tasks[stage.name] = task(_tracking_errors_told(stage), **options)
    return tasks


def _run_in_parallel(params: Params) -> bool:
    """Fine-tune the networks at the same time on a GPU; on a CPU they would only share the same cores."""
    from cass.training import resolve_device

    mode = params.retrain.parallel_finetune
    return mode == "always" or (mode == "auto" and resolve_device(params.finetune.device).type == "cuda")


def _share_loader_cores(params: Params, trainings: int) -> Params:
    """``finetune.num_workers: auto`` for ``trainings`` fine-tunings at once: the spare cores split among them."""
    from cass.training import resolve_device, resolve_num_workers

    cfg = params.finetune
    if cfg.num_workers != "auto":
        return params
    workers = resolve_num_workers("auto", resolve_device(cfg.device), processes=trainings)
    return params.model_copy(update={"finetune": cfg.model_copy(update={"num_workers": workers})})


def as_tasks(tasks: dict[str, Task]) -> Execute:
    """The :data:`cass.pipeline.Execute` of the flow: each stage runs as its task; a parallel stage's networks
    are submitted together when :func:`_run_in_parallel` says so, sharing the loader cores."""

    def execute(
        stage: Stage, run: PipelineRun, networks: Sequence[Network | None], started: Callable[[Network | None], None]
    ) -> list[Any]:
        step = tasks[stage.name]
        if stage.parallel and len(networks) > 1 and _run_in_parallel(run.params):
            run = replace(run, params=_share_loader_cores(run.params, len(networks)))
            futures = []
            for network in networks:
                started(network)
                futures.append(step.submit(run, network))
            return [future.result() for future in futures]
        return call(replace(stage, run=step), run, networks, started)

    return execute


@task(name="champions", cache_policy=NO_CACHE)
def read_champions(params: Params) -> dict[str, str | None]:
    with tracking.reaching(params.mlflow, "reading the champions"):
        return tracking.champions(params)


# --------------------------------------------------------------------------------------------------
# What the run tells its users


def _links(params: Params) -> MlflowLinks:
    return MlflowLinks(tracking.tracking_uri(params.mlflow), tracking.experiment_id(params.mlflow) or "?")


def _data_facts(params: Params, layout: Layout) -> dict[str, str]:
    lineage = tracking.pipeline_lineage(params, layout.data)
    return {"dataset": params.data.name, "data_version": lineage.data_version, "data_hash": data_hash(layout.data),
            "test_set": lineage.test_set}


def _publish_gate(exc: GateFailed) -> None:
    """A table artifact of the checks that stopped the run."""
    if isinstance(exc, ModelGateFailed):
        key, results = MODEL_GATE_KEY, list(exc.failed)
        description = ("Failed checks of the model gate; the networks listed were not registered or promoted "
                       "(see the retraining summary for the ones that passed).")
    else:
        key, results = DATA_GATE_KEY, [(exc.result.suite if exc.result else "data", exc.result)]
        description = "Failed checks of the data-quality gate; nothing was trained, registered or promoted after it."
    rows = gate_table([(label, r) for label, r in results if r is not None and not r.success])
    if rows:
        create_table_artifact(rows, key=key, description=description)


def _unchanged(run: PipelineRun, io: dict[str, Any]) -> dict[str, Any]:
    get_run_logger().info("nothing changed since the completed run %s (run key %s): nothing trained",
                          run.earlier_run_id, run.run_key[:12])
    champions = read_champions.with_options(**io)(run.params)
    text = unchanged_markdown(**_data_facts(run.params, run.layout), run_key=run.run_key, links=_links(run.params),
                              earlier_run_id=run.earlier_run_id, champions=champions)
    create_markdown_artifact(text, key=SUMMARY_KEY, description="Nothing changed since a completed run")
    return {"outcome": "unchanged", "run_id": run.earlier_run_id, "run_key": run.run_key, "champions": champions}


def _completed(run: PipelineRun) -> dict[str, Any]:
    pretraining = (run.pretraining.run_id, run.pretraining.reused) if run.pretraining else None
    stage_runs = {"pretrain": run.pretraining.run_id} if run.pretraining and not run.pretraining.reused else {}
    for network in run.networks:
        stage_runs[f"finetune-{network}"] = run.finetuned[network].run_id
        stage_runs[f"evaluate-{network}"] = run.evaluations[network].candidate.tags["evaluation_run_id"]
    summary = RunSummary(
        **_data_facts(run.params, run.layout), run_key=run.run_key, label_fraction=run.params.finetune.label_fraction,
        links=_links(run.params), pipeline_run_id=run.run_id, pretraining=pretraining, tuning=dict(run.best_params),
        stage_runs=stage_runs, metrics=run.metrics, promotions=dict(run.promotions),
        gate_failures={network: result.summary() for network, result in run.gate_failures.items()},
    )
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_KEY, description="Retraining summary")
    for network, change in run.data_changes.items():  # why it retrained: what changed since the champion's data
        if change is not None:
            create_markdown_artifact(f"{change.markdown}\nThe full report (a page that renders offline, with the "
                                     f"histograms): `{change.uri}`.\n", key=f"data-change-{network}",
                                     description=f"Data change since champion v{change.champion} ({network})")
    for result in run.promotions.values():
        get_run_logger().info("%s", result.summary())
    return {
        "outcome": "completed",
        "run_id": run.run_id,
        "run_key": run.run_key,
        "pretraining": {"run_id": run.pretraining_run_id, "reused": bool(run.pretraining and run.pretraining.reused)},
        "versions": dict(run.versions),
        "promotions": {n: {"promoted": p.promoted, "champion": p.champion, "reason": p.reason, "summary": p.summary()}
                       for n, p in run.promotions.items()},
        "metrics": {n: {k: m.get(k) for k in (*(key for key, _ in METRICS), "num_samples")}
                    for n, m in run.metrics.items()},
    }


# --------------------------------------------------------------------------------------------------
# The flow


def ensure_concurrency_limit(name: str) -> None:
    """Create the global concurrency limit ``name`` with one slot, unless it exists (then its limit stands)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                get_run_logger().info("created the global concurrency limit %r with 1 slot", name)


@flow(name=FLOW_NAME, flow_run_name=run_name, on_failure=[notify_failed], on_crashed=[notify_failed],
      description="Retrain CASS: data gate, pretraining, tuning, fine-tuning of the CNN and the ViT, "
      "evaluation, model gate, registration and promotion in MLflow.")
def retrain(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    dataset: str | None = None,
    label_fraction: float | None = None,
    pretrain_epochs: int | None = None,
    tune_trials: int | None = None,
    data_version: str | None = None,
    outputs: str = "outputs",
    force: bool = False,
) -> dict[str, Any]:
    """Retrain both networks and promote them when they pass the gate and beat the champion.

    Args:
        params_file: the settings file (relative to the working directory of the run).
        overrides: ``section.key=value`` settings over the file, as ``cass --set``.
        dataset: a dataset name under data/ or a folder (sets data.name and data.root).
        label_fraction: share of the labelled training images used for fine-tuning.
        pretrain_epochs: CASS pretraining epochs.
        tune_trials: Optuna trials per network; 0 skips tuning (default: tune.n_trials trials when
            tune.enabled, else no tuning).
        data_version: a git revision whose data.dvc names the data; pulled with DVC first (default: the
            data in the working tree).
        outputs: root of the stage outputs.
        force: retrain everything, pretraining included, even when nothing changed since the last completed run.
    """
    from prefect.concurrency.sync import concurrency
    from prefect.runtime import flow_run

    install_log_redaction()  # the flow run's logs go to the Prefect API: no tracking password in them
    library_logs_to_the_run_log()
    params = flow_params(params_file, overrides or [], dataset=dataset, label_fraction=label_fraction,
                         pretrain_epochs=pretrain_epochs, tune_trials=tune_trials)
    run = PipelineRun(params, Layout(Path(outputs)), tracked=True, tuning=tunes(params, tune_trials), force=force,
                      reuse_pretraining=not force,
                      data_version=data_version, params_file=Path(params_file),
                      run_tags={"prefect_flow_run_id": str(flow_run.id or "")})
    limit = params.retrain.concurrency_limit
    if limit:
        ensure_concurrency_limit(limit)
    with concurrency(limit, occupy=1, strict=True) if limit else contextlib.nullcontext():
        try:
            done = run_stages(run, as_tasks(stage_tasks(params.retrain)), get_run_logger().info)
        except GateFailed as exc:
            _publish_gate(exc)
            raise
    if done.earlier_run_id is not None:
        return _unchanged(done, io_options(params.retrain))
    result = _completed(done)
    notify_refused(params.retrain.notify, done.promotions)
    failure = gate_failure(done)
    if failure is not None:  # the networks that passed are registered (and promoted); the run still fails
        _publish_gate(failure)
        raise failure
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.retrain``: one flow run in this process (a temporary Prefect server if none is set)."""
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.description)
    parser.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dataset")
    parser.add_argument("--label-fraction", type=float)
    parser.add_argument("--pretrain-epochs", type=int)
    parser.add_argument("--tune-trials", type=int)
    parser.add_argument("--data-version")
    parser.add_argument("--outputs", default="outputs")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    state = retrain(params_file=args.params, overrides=args.overrides, dataset=args.dataset,
                    label_fraction=args.label_fraction, pretrain_epochs=args.pretrain_epochs,
                    tune_trials=args.tune_trials, data_version=args.data_version, outputs=args.outputs,
                    force=args.force, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
