"""The retraining flow: [dvc pull] -> prepare + data gate -> pretrain -> tune -> fine-tune -> evaluate ->
model gate -> register -> promote.

Every task calls the stage function that the CLI and ``dvc.yaml`` call, through :mod:`cass.tracking`,
which logs each stage as a child run of one MLflow parent run. Tasks pass paths, run ids and hashes,
never models. Only I/O is retried (``dvc pull``, MLflow run creation, report uploads, registration,
promotion), with the delays of the ``retrain:`` settings; a failed gate ends the flow Failed with a table
artifact of the failed checks, and nothing is registered or promoted.

A run whose data and result-changing settings equal those of a completed run trains nothing
(:mod:`cass.retraining`); a run that changes only fine-tuning settings reuses the pretraining.

    prefect deploy --all                                   # the deployments of prefect.yaml
    prefect deployment run 'cass-retrain/retrain-on-demand' -p label_fraction=0.1
    python -m flows.retrain --set finetune.epochs=5        # one run here, without a deployment
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cass.config import Params, RetrainConfig, load_params
from cass.errors import ConfigError, DataError, GateFailed, VersioningError
from cass.layout import Layout
from flows.report import METRICS, MlflowLinks, RunSummary, gate_table, summary_markdown, unchanged_markdown

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


def with_study_suffix(params: Params, key: str) -> Params:
    """One Optuna study per run key: trials of other settings or data never mix (cass.tune refuses them)."""
    name = f"{params.tune.study_name}-{key[:12]}"
    return params.model_copy(update={"tune": params.tune.model_copy(update={"study_name": name})})


# --------------------------------------------------------------------------------------------------
# Progress


class Stages:
    """The progress display: numbered stage lines ("[4/10] fine-tune cnn") in the flow run's log."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.done = 0

    def __call__(self, name: str) -> None:
        self.done += 1
        get_run_logger().info("[%d/%d] %s", self.done, len(self.names), name)


def plan(params: Params, *, tuning: bool, data_version: str | None) -> list[str]:
    networks = list(params.finetune.networks)
    return [
        *(["dvc pull"] if data_version else []),
        "prepare",
        "data gate",
        *(["pretrain"] if params.finetune.init == "cass" else []),
        *([f"tune {n}" for n in networks] if tuning else []),
        *(f"fine-tune {n}" for n in networks),
        *(f"evaluate {n}" for n in networks),
        "model gate",
        *(f"register {n}" for n in networks),
        *(f"promote {n}" for n in networks),
    ]


# --------------------------------------------------------------------------------------------------
# Tasks


@task(name="dvc pull", cache_policy=NO_CACHE)
def pull_data(revision: str) -> str:
    """The dataset of ``revision``: its data.dvc from git, then ``dvc pull`` (a checked remote)."""
    from cass import versioning

    root = versioning.project_root()
    proc = subprocess.run(["git", "checkout", revision, "--", versioning.DATA_DVC], cwd=root, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"data_version {revision!r}: `git checkout {revision} -- {versioning.DATA_DVC}` failed: "
                          f"{proc.stderr.strip()}; give a commit, tag or branch whose {versioning.DATA_DVC} holds it")
    try:
        return versioning.pull([versioning.DATA_DVC], root=root)
    except VersioningError as exc:
        raise VersioningError(f"data_version {revision}: {exc}") from None


@task(name="check MLflow", cache_policy=NO_CACHE)
def check_tracking(params: Params) -> str:
    """The tracking store answers (a server within mlflow.server_timeout_s) and the experiment exists."""
    from cass.tracking import configure

    return configure(params.mlflow)


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(params: Params, layout: Layout, tuning: bool) -> str:
    """Manifest, splits and subsets (the ``prepare`` stage); returns the run key."""
    from cass.data.prepare import prepare_data
    from cass.pipeline import ensure_demo_data
    from cass.retraining import run_key

    ensure_demo_data(params)
    prepare_data(params, layout.data)
    return run_key(params, layout.data, tuning=tuning)


@task(name="find an unchanged run", cache_policy=NO_CACHE)
def find_unchanged(params: Params, key: str) -> str | None:
    from cass.retraining import find_completed_run
    from cass.tracking import configure_client

    configure_client(params.mlflow)
    run = find_completed_run(params, key)
    return None if run is None else run.info.run_id


@task(name="start MLflow run", cache_policy=NO_CACHE)
def start_run(params: Params, layout: Layout, params_file: str, key: str, flow_run: str) -> str:
    from cass.retraining import RUN_KEY_TAG
    from cass.tracking import start_pipeline_run

    tags = {RUN_KEY_TAG: key, "prefect_flow_run_id": flow_run}
    return start_pipeline_run(params, layout, params_file=Path(params_file), tags=tags)


def _publish_gate(results: Sequence[tuple[str, Any]], key: str, what: str) -> None:
    rows = gate_table([(label, r) for label, r in results if r is not None and not r.success])
    if rows:
        create_table_artifact(rows, key=key, description=f"Failed checks of the {what}; nothing was trained, "
                              "registered or promoted after it." if key == DATA_GATE_KEY else
                              f"Failed checks of the {what}; nothing was registered or promoted.")


@task(name="data gate", cache_policy=NO_CACHE)
def data_gate(params: Params, layout: Layout) -> None:
    """The manifest and split gates; a failure stops the run before any training."""
    from cass.pipeline import validate_data

    try:
        validate_data(params, layout)
    except GateFailed as exc:
        _publish_gate([(exc.result.suite if exc.result else "data", exc.result)], DATA_GATE_KEY, "data-quality gate")
        raise


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_stage(params: Params, layout: Layout, parent: str) -> tuple[str, bool]:
    from cass.tracking import tracked_pretrain

    result = tracked_pretrain(params, layout, parent)
    if result.reused:
        get_run_logger().info("pretraining reused (run %s): nothing to train", result.run_id)
    return result.run_id, result.reused


@task(name="tune", task_run_name="tune-{network}", cache_policy=NO_CACHE)
def tune_stage(params: Params, layout: Layout, network: str, parent: str) -> str:
    """The Optuna search of one network; its study's MLflow run is nested under the pipeline run."""
    import mlflow
    import optuna

    from cass.tracking import configure_client
    from cass.tune import PARENT_RUN_ATTR, resolve_storage, route_optuna_logging, study_name, tune

    route_optuna_logging()
    out_dir = layout.tune
    pre_dir = layout.pretrain if params.finetune.init == "cass" else None
    best = tune(params, layout.data, network, out_dir, pre_dir)
    configure_client(params.mlflow)
    storage = resolve_storage(params, out_dir, network)
    study = optuna.load_study(study_name=study_name(params.tune, network), storage=storage)
    study_run = study.user_attrs.get(PARENT_RUN_ATTR)
    if study_run:
        mlflow.MlflowClient().set_tag(study_run, "mlflow.parentRunId", parent)
    return str(best)


@task(name="fine-tune", task_run_name="fine-tune-{network}", cache_policy=NO_CACHE)
def finetune_stage(params: Params, layout: Layout, network: str, parent: str, pretraining: str | None,
                   best_params: str | None):
    from cass.tracking import tracked_finetune
    from cass.tune import apply_best_params

    if best_params:
        params = apply_best_params(params, Path(best_params), network)
    return tracked_finetune(params, layout, network, parent, pretraining)


@task(name="evaluate", task_run_name="evaluate-{network}", cache_policy=NO_CACHE)
def evaluate_stage(params: Params, layout: Layout, network: str, parent: str, finetuned, pretraining: str | None):
    from cass.tracking import tracked_evaluate

    return tracked_evaluate(params, layout, network, parent, finetuned, pretraining)


@task(name="model gate", cache_policy=NO_CACHE)
def model_gate(params: Params, layout: Layout, networks: Sequence[str]) -> None:
    """The model suite on each network's test metrics; any failure stops the run before registration."""
    from cass.quality import validate_model

    results = [
        (network, validate_model(params, layout.evaluate_metrics(network), layout.quality("model") / network,
                                 raise_on_failure=False))
        for network in networks
    ]
    failed = [(network, r) for network, r in results if not r.success]
    if failed:
        _publish_gate(failed, MODEL_GATE_KEY, "model gate")
        raise GateFailed("\n".join(f"{network}: {r.summary()}" for network, r in failed)
                         + "\nnothing was registered or promoted", failed[0][1])


@task(name="log quality reports", cache_policy=NO_CACHE)
def log_reports(params: Params, layout: Layout, parent: str) -> None:
    from cass.tracking import log_quality

    log_quality(params, layout, parent)


@task(name="register", task_run_name="register-{candidate.network}", cache_policy=NO_CACHE)
def register_stage(params: Params, candidate, parent: str) -> str:
    from cass.tracking import register_candidate

    return register_candidate(params, candidate, parent)


@task(name="promote", task_run_name="promote-{network}", cache_policy=NO_CACHE)
def promote_stage(params: Params, network: str, version: str, parent: str):
    from cass.tracking import promote_candidate

    return promote_candidate(params, network, version, parent)


@task(name="finish MLflow run", cache_policy=NO_CACHE)
def finish_run(parent: str, status: str, tags: dict[str, str]) -> None:
    from cass.tracking import end_pipeline_run

    end_pipeline_run(parent, status, tags)


@task(name="champions", cache_policy=NO_CACHE)
def read_champions(params: Params) -> dict[str, str | None]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from cass.registry import CHAMPION, model_name
    from cass.tracking import configure_client

    configure_client(params.mlflow)
    client, champions = mlflow.MlflowClient(), {}
    for network in params.finetune.networks:
        name = model_name(params.mlflow, network)
        try:
            version = client.get_registered_model(name).aliases.get(CHAMPION)
        except MlflowException:
            version = None
        champions[network] = f"{name} v{version}" if version else None
    return champions


# --------------------------------------------------------------------------------------------------
# The flow


def _links(params: Params) -> MlflowLinks:
    import mlflow

    from cass.tracking import configure_client

    uri = configure_client(params.mlflow)
    experiment = mlflow.MlflowClient().get_experiment_by_name(params.mlflow.experiment)
    return MlflowLinks(uri, experiment.experiment_id if experiment else "?")


def _data_facts(params: Params, layout: Layout) -> dict[str, str]:
    from cass.retraining import data_hash
    from cass.tracking import pipeline_lineage

    lineage = pipeline_lineage(params, layout.data)
    return {"dataset": params.data.name, "data_version": lineage.data_version, "data_hash": data_hash(layout.data),
            "test_set": lineage.test_set}


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


def _finetune_all(params, layout, parent, pretraining, best, stages: Callable[[str], None]) -> dict[str, Any]:
    networks = list(params.finetune.networks)
    if _run_in_parallel(params):
        params = _share_loader_cores(params, len(networks))
        futures = {}
        for network in networks:
            stages(f"fine-tune {network}")
            futures[network] = finetune_stage.submit(params, layout, network, parent, pretraining, best.get(network))
        return {network: future.result() for network, future in futures.items()}
    finetuned = {}
    for network in networks:
        stages(f"fine-tune {network}")
        finetuned[network] = finetune_stage(params, layout, network, parent, pretraining, best.get(network))
    return finetuned


@flow(name=FLOW_NAME, description="Retrain CASS: data gate, pretraining, tuning, fine-tuning of the CNN and the ViT, "
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
        tune_trials: Optuna trials per network; 0 skips tuning (default: tune.n_trials).
        data_version: a git revision whose data.dvc names the data; pulled with DVC first (default: the
            data in the working tree).
        outputs: root of the stage outputs.
        force: retrain even when nothing changed since the last completed run.
    """
    from prefect.concurrency.sync import concurrency

    params = flow_params(params_file, overrides or [], dataset=dataset, label_fraction=label_fraction,
                         pretrain_epochs=pretrain_epochs, tune_trials=tune_trials)
    limit = params.retrain.concurrency_limit
    if limit:
        ensure_concurrency_limit(limit)
    with concurrency(limit, occupy=1, strict=True) if limit else contextlib.nullcontext():
        return _retrain(params, Layout(Path(outputs)), params_file, tuning=tune_trials != 0,
                        data_version=data_version, force=force)


def _retrain(params: Params, layout: Layout, params_file: str, *, tuning: bool, data_version: str | None,
             force: bool) -> dict[str, Any]:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    stages = Stages(plan(params, tuning=tuning, data_version=data_version))
    io = io_options(params.retrain)
    networks = list(params.finetune.networks)

    check_tracking.with_options(**io)(params)  # before anything is pulled, prepared or trained
    if data_version:
        stages("dvc pull")
        pull_data.with_options(**io)(data_version)
    stages("prepare")
    key = prepare(params, layout, tuning)
    earlier = None if force else find_unchanged.with_options(**io)(params, key)
    if earlier is not None:
        champions = read_champions.with_options(**io)(params)
        text = unchanged_markdown(**_data_facts(params, layout), run_key=key, links=_links(params),
                                  earlier_run_id=earlier, champions=champions)
        create_markdown_artifact(text, key=SUMMARY_KEY, description="Nothing changed since a completed run")
        logger.info("nothing changed since the completed run %s (run key %s): nothing trained", earlier, key[:12])
        return {"outcome": "unchanged", "run_id": earlier, "run_key": key, "champions": champions}

    parent = start_run.with_options(**io)(params, layout, params_file, key, str(flow_run.id or ""))
    try:
        stages("data gate")
        data_gate(params, layout)
        pretraining = None
        if params.finetune.init == "cass":
            stages("pretrain")
            pretraining = pretrain_stage(params, layout, parent)
        pre_id = pretraining[0] if pretraining else None
        best = {}
        if tuning:
            tuned = with_study_suffix(params, key)
            for network in networks:
                stages(f"tune {network}")
                best[network] = tune_stage(tuned, layout, network, parent)
        finetuned = _finetune_all(params, layout, parent, pre_id, best, stages)
        candidates = {}
        for network in networks:
            stages(f"evaluate {network}")
            candidates[network] = evaluate_stage(params, layout, network, parent, finetuned[network], pre_id)
        stages("model gate")
        model_gate(params, layout, networks)
        log_reports.with_options(**io)(params, layout, parent)
        versions = {}
        for network in networks:
            stages(f"register {network}")
            versions[network] = register_stage.with_options(**io)(params, candidates[network], parent)
        promotions = {}
        for network in networks:
            stages(f"promote {network}")
            promotions[network] = promote_stage.with_options(**io)(params, network, versions[network], parent)
        from cass.retraining import COMPLETED, OUTCOME_TAG

        finish_run.with_options(**io)(parent, "FINISHED", {OUTCOME_TAG: COMPLETED})
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the error that stopped the run is what the user must see
            if isinstance(exc, GateFailed):
                from cass.tracking import log_quality

                log_quality(params, layout, parent)
            from cass.tracking import end_pipeline_run

            end_pipeline_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise

    stage_runs = {}
    if pretraining and not pretraining[1]:
        stage_runs["pretrain"] = pretraining[0]
    for network in networks:
        stage_runs[f"finetune-{network}"] = finetuned[network].run_id
        stage_runs[f"evaluate-{network}"] = candidates[network].tags["evaluation_run_id"]
    summary = RunSummary(
        **_data_facts(params, layout), run_key=key, label_fraction=params.finetune.label_fraction,
        links=_links(params), pipeline_run_id=parent, pretraining=pretraining, tuning=best, stage_runs=stage_runs,
        metrics={n: c.metrics for n, c in candidates.items()}, promotions=promotions,
    )
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_KEY, description="Retraining summary")
    for result in promotions.values():
        logger.info("%s", result.summary())
    return {
        "outcome": "completed",
        "run_id": parent,
        "run_key": key,
        "pretraining": {"run_id": pre_id, "reused": bool(pretraining and pretraining[1])},
        "versions": versions,
        "promotions": {n: {"promoted": p.promoted, "champion": p.champion, "reason": p.reason, "summary": p.summary()}
                       for n, p in promotions.items()},
        "metrics": {n: {k: c.metrics.get(k) for k in (*(m for m, _ in METRICS), "num_samples")}
                    for n, c in candidates.items()},
    }


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
