"""The tracked stages: each training stage in a child run of the pipeline's parent run, and the
registration and promotion of the evaluated networks.

Each is a plain function of the settings, the output layout and run ids, so that the pipeline runner
(:mod:`cass.pipeline`) calls them the same way in this process and in a Prefect task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cass import registry
from cass.config import Network, Params
from cass.errors import TrainingError
from cass.layout import FinetuneOutputs, Layout
from cass.retraining import (
    PRETRAIN_FINGERPRINT_TAG,
    completed_run_filter,
    finished_checkpoint,
    pretrain_fingerprint,
    pretraining_filter,
)
from cass.tracking.client import configure, configure_client, latest_run_id, with_retries
from cass.tracking.runs import Lineage, RunLogger, numeric_items, pipeline_lineage, run_tags, stage_run, test_set_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRun:
    """The MLflow run of a stage; ``reused`` when an earlier run's outputs were used instead of training."""

    run_id: str
    reused: bool = False


@dataclass(frozen=True)
class FinetuneRun:
    """A fine-tuning run and the model it logged."""

    run_id: str
    model_id: str
    model_uri: str


def first_test_image(data_dir: Path) -> bytes:
    """The bytes of one test image: the input example logged with each model."""
    from cass.data.images import read_bytes
    from cass.data.manifest import read_manifest

    df, info = read_manifest(Path(data_dir))
    rows = df[df["split"] == "test"]
    rows = rows if len(rows) else df
    return read_bytes(Path(info.root) / rows["path"].iloc[0])


def completed_run(params: Params, key: str) -> str | None:
    """The latest finished pipeline run with run key ``key`` whose models were registered: a run with the
    same data and result-changing settings that need not train again (:mod:`cass.retraining`)."""
    return latest_run_id(params.mlflow, completed_run_filter(key))


def reusable_pretraining(params: Params, layout: Layout) -> str | None:
    """The MLflow run of the finished pretraining on disk, when the current settings would train the same.

    None when the checkpoint is missing, unfinished or made with other settings or data, or when no
    finished run recorded its fingerprint (then the stage runs: it resumes, and logs a run)."""
    if not finished_checkpoint(params, layout.data, layout.pretrain):
        return None
    return latest_run_id(params.mlflow, pretraining_filter(pretrain_fingerprint(params, layout.data)))


def tracked_pretrain(params: Params, layout: Layout, parent_run_id: str, *, progress: bool = True) -> StageRun:
    """Pretrain in a child run, or reuse the finished pretraining on disk when it has the current settings.

    Reuse needs a finished checkpoint with the current fingerprint (settings and data, see
    :mod:`cass.retraining`) and a finished run that recorded it; that run's id is returned.
    """
    from cass.pretrain import pretrain

    configure(params.mlflow)
    earlier = reusable_pretraining(params, layout)
    if earlier is not None:
        log.info("pretraining reused (run %s): %s holds a finished pretraining with these settings and data",
                 earlier, layout.pretrain)
        RunLogger(params.mlflow, parent_run_id).tags({"pretraining_reused_from": earlier})
        return StageRun(earlier, reused=True)
    fingerprint = pretrain_fingerprint(params, layout.data)
    with stage_run(params, layout.data, parent_run_id, "pretrain", **{PRETRAIN_FINGERPRINT_TAG: fingerprint}) as run:
        out = pretrain(params, layout.data, layout.pretrain, callbacks=[run.epoch], progress=progress)
        run.training_stage(out.out_dir, out.metrics, out.history, "pretraining")
        run.artifact(out.networks)
    return StageRun(run.run_id)


def tracked_finetune(
    params: Params, layout: Layout, network: Network, parent_run_id: str, pretraining_run_id: str | None = None,
    *, progress: bool = True, tags: Mapping[str, str | None] | None = None,
) -> FinetuneRun:
    """Fine-tune ``network`` in a child run and log the model (a pyfunc that rebuilds it, no pickle).
    ``tags``: more tags of the run (e.g. which settings came from tuning)."""
    from cass.finetune import finetune
    from cass.serving import log_classifier

    pre_dir = layout.pretrain if params.finetune.init == "cass" else None
    tags = {**(tags or {}), "pretraining_run_id": pretraining_run_id}
    with stage_run(params, layout.data, parent_run_id, "finetune", network, **tags) as run:
        ft = finetune(params, layout.data, network, layout.finetune(network), pre_dir,
                      callbacks=[run.epoch], progress=progress)
        run.training_stage(ft.out_dir, ft.metrics, ft.history, f"fine-tuning {network}")
        example = first_test_image(layout.data)
        model = with_retries(
            f"logging the {network} model", lambda: log_classifier(ft.out_dir, example), params.mlflow
        )
    return FinetuneRun(run.run_id, model.model_id, model.model_uri)


def tracked_evaluate(
    params: Params, layout: Layout, network: Network, parent_run_id: str, finetuned: FinetuneRun,
    pretraining_run_id: str | None = None,
) -> registry.Candidate:
    """Evaluate ``network`` on the test split in a child run; returns what registration needs."""
    from cass.evaluate import evaluate

    tags = {"pretraining_run_id": pretraining_run_id, "finetune_run_id": finetuned.run_id,
            "model_id": finetuned.model_id}
    with stage_run(params, layout.data, parent_run_id, "evaluate", network, **tags) as run:
        evaluate(params, layout.data, layout.finetune(network), layout.evaluate(network))
        metrics = run.evaluation(layout.evaluate(network), finetuned.model_id)
        values = numeric_items(metrics, "test_")
        RunLogger(params.mlflow, parent_run_id).metrics({f"{network}_{k}": v for k, v in values.items()})
    lineage = pipeline_lineage(params, layout.data)
    return registry.Candidate(
        network=network,
        model_uri=finetuned.model_uri,
        metrics=metrics,
        tags=lineage.tags(network, pipeline_run_id=parent_run_id, evaluation_run_id=run.run_id,
                          arch=metrics.get("arch"), **tags),
    )


def log_quality(params: Params, layout: Layout, parent_run_id: str) -> None:
    """The quality gates' reports (Data Docs, result.json) into the parent run, when the gates wrote them."""
    folder = layout.quality_dir
    if folder.is_dir():
        RunLogger(params.mlflow, parent_run_id).redacted_folder(
            folder, "data_quality", exclude=(layout.decode_cache.name,)
        )


def register_candidate(params: Params, candidate: registry.Candidate, parent_run_id: str) -> str:
    """Register ``candidate`` (safe to retry, :func:`cass.registry.register_once`); returns the version."""
    configure_client(params.mlflow)
    mv = registry.register_once(params, candidate)
    name = registry.model_name(params.mlflow, candidate.network)
    RunLogger(params.mlflow, parent_run_id).tags({f"{candidate.network}_registered_version": f"{name}/{mv.version}"})
    return str(mv.version)


def promote_candidate(params: Params, network: Network, version: str, parent_run_id: str) -> registry.PromotionResult:
    """Promote a registered version behind the gate (:func:`cass.registry.promote`); returns the decision."""
    configure_client(params.mlflow)
    result = registry.promote(registry.model_name(params.mlflow, network), version, params)
    RunLogger(params.mlflow, parent_run_id).tags({f"{network}_promotion": result.summary()})
    return result


def champions(params: Params) -> dict[str, str | None]:
    """Each fine-tuned network's champion as ``<name> v<version>`` (None where there is none)."""
    configure_client(params.mlflow)
    return registry.champions(params.mlflow, params.finetune.networks)


def register_outputs(
    params: Params, layout: Layout, networks: Sequence[Network], params_file: Path | None = None
) -> dict:
    """Log fine-tuned models already on disk (``cass finetune`` + ``cass evaluate``) and register them.

    For stage runs made outside a tracked pipeline (e.g. by ``dvc repro``): one run per network holds
    the fine-tuning files, the model and the evaluation; returns ``{network: ModelVersion}``.
    """
    import mlflow

    from cass.data.manifest import read_manifest
    from cass.serving import log_classifier

    cfg = params.mlflow
    for network in networks:
        for path in (FinetuneOutputs(layout.finetune(network)).weights, layout.evaluate_metrics(network)):
            if not path.is_file():
                raise TrainingError(f"{path}: not found; run `cass finetune` and `cass evaluate` for {network} first")
    configure(cfg)
    _, info = read_manifest(layout.data)
    lineage = Lineage(params.data.name, params.finetune.label_fraction, info.git_commit, info.data_version,
                      test_set_hash(layout.data))
    example = first_test_image(layout.data)
    versions = {}
    for network in networks:
        ft = FinetuneOutputs(layout.finetune(network))
        tags = run_tags(lineage.tags(network, stage="register"))
        with mlflow.start_run(run_name=f"register-{network}", tags=tags) as active:
            run = RunLogger(cfg, active.info.run_id)
            run.params(params)
            run.params_files(params, params_file)
            run.training_stage(ft.out_dir, ft.metrics, ft.history, f"fine-tuning {network}")
            model = with_retries(f"logging the {network} model", lambda ft=ft: log_classifier(ft.out_dir, example), cfg)
            metrics = run.evaluation(layout.evaluate(network), model.model_id)
            candidate = registry.Candidate(
                network=network,
                model_uri=model.model_uri,
                metrics=metrics,
                tags=lineage.tags(network, finetune_run_id=run.run_id, evaluation_run_id=run.run_id,
                                  arch=metrics.get("arch")),
            )
            versions[network] = registry.register(params, candidate)
    return versions
