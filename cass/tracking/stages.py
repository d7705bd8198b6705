"""The MLflow steps of a pipeline beyond its training stages: the "nothing changed" and reusable-pretraining
look-ups, the data-change report, the quality reports, registration and promotion of the evaluated networks,
and the registration of models already on disk (``cass register`` after ``dvc repro``).

Each is a plain function of the settings, the output layout and run ids, so that the pipeline runner
(:mod:`cass.pipeline`) calls them the same way in this process and in a Prefect task. The training stages
themselves are in :mod:`cass.stages`; :class:`cass.tracking.tracker.MlflowTracker` logs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cass import registry
from cass.config import Network, Params
from cass.errors import TrainingError
from cass.outputs import FinetuneOutputs, Layout
from cass.quality.policy import GatePolicy
from cass.run_keys import (
    completed_run_filter,
    finished_checkpoint,
    pretrain_fingerprint,
    pretraining_filter,
)
from cass.tracking.client import configure, configure_client, latest_run_id, with_retries
from cass.tracking.redact import redact_mapping
from cass.tracking.runs import RunLogger
from cass.tracking.tags import LineageTags, data_digest, label_of, model_lineage, run_name, run_tags

log = logging.getLogger(__name__)


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
    same data and result-changing settings that need not train again (:mod:`cass.run_keys`)."""
    return latest_run_id(params.mlflow, completed_run_filter(key))


def reusable_pretraining(params: Params, layout: Layout) -> str | None:
    """The MLflow run of the finished pretraining on disk, when the current settings would train the same.

    None when the checkpoint is missing, unfinished or made with other settings or data, or when no
    finished run recorded its fingerprint (then the stage runs: it resumes, and logs a run)."""
    if not finished_checkpoint(params, layout.data, layout.pretrain):
        return None
    return latest_run_id(params.mlflow, pretraining_filter(pretrain_fingerprint(params, layout.data)))


def keep_manifest(run: RunLogger, data_dir: Path) -> str:
    """Log the prepared manifest the version was trained, validated and tested on to its evaluation run
    (``data/manifest.csv``; MLflow's dataset input keeps no rows) and return its hash: what a later
    promotion reads to find the images neither model has seen (:mod:`cass.comparison`)."""
    from cass.comparison import MANIFEST_DIR, MANIFEST_TAG, manifest_digest
    from cass.outputs import MANIFEST_FILE

    path = Path(data_dir) / MANIFEST_FILE
    digest = manifest_digest(path)
    run.artifact(path, MANIFEST_DIR)
    run.tags({MANIFEST_TAG: digest})
    return digest


@dataclass(frozen=True)
class DataChange:
    """A data-change report of one network: its markdown (for a Prefect artifact) and where it was logged."""

    network: Network
    champion: str
    markdown: str
    folder: Path
    uri: str


def data_change(params: Params, layout: Layout, network: Network, evaluation_run_id: str) -> DataChange | None:
    """Why this run retrained ``network``: the data-change report against its champion's data version
    (:mod:`cass.data_change`), written to ``<outputs>/data_change/<network>`` and logged to the evaluation run
    (``data_change/``, where the version's model card finds it). None when there is no champion yet or it was
    trained on this very manifest."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cass import comparison
    from cass import data_change as report
    from cass.data.manifest import read_manifest
    from cass.outputs import MANIFEST_FILE

    configure_client(params.mlflow)
    client = mlflow.MlflowClient()
    name = registry.model_name(params.mlflow, network)
    try:  # an outage raises (the flow retries the step); only a model not registered yet means "no champion"
        champion = client.get_registered_model(name).aliases.get(registry.CHAMPION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        champion = None
    if champion is None:
        return None
    champion = str(champion)
    digest = comparison.manifest_digest(layout.data / MANIFEST_FILE)
    champion_tags = client.get_model_version(name, champion).tags
    if champion_tags.get(comparison.MANIFEST_TAG) == digest:
        return None
    try:
        before = comparison.version_manifest(client, name, champion)
    except comparison.ComparisonError as exc:
        log.warning("no data-change report for %s: %s", network, exc)
        return None
    after, _ = read_manifest(layout.data)
    after = after.astype(str)
    unseen = comparison.unseen_rows(before, after)
    own = registry.version_metrics(client, name, champion)
    note, on_unseen = "", {}
    classes, _multi = comparison.model_kind(own)
    new_classes = {c for v in after["labels"] for c in str(v).split("|") if c}
    if not new_classes <= set(classes):
        note = (f"The new data has classes the champion does not predict ({sorted(new_classes - set(classes))}): "
                "its metrics on the new images are not computed.")
    elif unseen.empty:
        note = "No test image of the new data is unseen by the champion: its decay cannot be measured."
    else:
        on_unseen = comparison.champion_on(params, name, champion, unseen, own)
    built = report.build(name, champion, before, after, Path(params.data.root), params.seed, own, on_unseen, unseen,
                         (champion_tags.get(comparison.MANIFEST_TAG, "unknown"), digest), note)
    folder = report.write(built, layout.data_change(network))
    RunLogger(params.mlflow, evaluation_run_id).artifact(folder, report.REPORT_DIR)
    uri = f"runs:/{evaluation_run_id}/{report.REPORT_DIR}/{report.REPORT_HTML}"
    log.info("%s: data-change report since champion v%s: %s (%s)", network, champion, folder / report.REPORT_HTML, uri)
    return DataChange(network, champion, report.to_markdown(built, figure=False), folder, uri)


def log_quality(params: Params, layout: Layout, parent_run_id: str) -> None:
    """The quality gates' reports (Data Docs, result.json) into the parent run, when the gates wrote them."""
    folder = layout.quality_dir
    if folder.is_dir():
        RunLogger(params.mlflow, parent_run_id).redacted_folder(
            folder, "data_quality", exclude=(layout.decode_cache.name,)
        )


def register_candidate(params: Params, candidate: registry.Candidate, parent_run_id: str,
                       policy: GatePolicy | None = None) -> str:
    """Register ``candidate`` (safe to retry, :func:`cass.registry.register_once`); returns the version."""
    configure_client(params.mlflow)
    mv = registry.register_once(params, candidate, policy=policy)
    name = registry.model_name(params.mlflow, candidate.network)
    RunLogger(params.mlflow, parent_run_id).tags({f"{candidate.network}_registered_version": f"{name}/{mv.version}"})
    return str(mv.version)


def promote_candidate(params: Params, network: Network, version: str, parent_run_id: str,
                      policy: GatePolicy | None = None) -> registry.PromotionResult:
    """Promote a registered version behind the gate and the committed ``policy`` (:func:`cass.registry.promote`);
    returns the decision."""
    configure_client(params.mlflow)
    result = registry.promote(registry.model_name(params.mlflow, network), version, params, policy=policy)
    RunLogger(params.mlflow, parent_run_id).tags({f"{network}_promotion": result.summary()})
    return result


def champions(params: Params) -> dict[str, str | None]:
    """Each fine-tuned network's champion as ``<name> v<version>`` (None where there is none)."""
    configure_client(params.mlflow)
    return registry.champions(params.mlflow, params.finetune.networks)


@dataclass(frozen=True)
class ModelOnDisk:
    """A fine-tuned network in the outputs and its evaluation, as recorded beside them."""

    network: Network
    lineage: LineageTags
    record: dict[str, Any]  # the fine-tuning's lineage.json
    settings: Params  # the settings it was trained with (tuned values included), from lineage.json
    metrics: dict[str, Any]  # the evaluation's metrics.json


def model_on_disk(params: Params, layout: Layout, network: Network) -> ModelOnDisk:
    """Read what registration needs from the outputs, refusing a model whose records are missing or stale."""
    from cass.config import params_from_mapping
    from cass.errors import ConfigError

    ft = FinetuneOutputs(layout.finetune(network))
    for path in (ft.weights, layout.evaluate_metrics(network)):
        if not path.is_file():
            raise TrainingError(f"{path}: not found; run `cass finetune` and `cass evaluate` for {network} first")
    lineage, record = model_lineage(layout, network)
    try:  # where to register is today's choice; everything about the model is as it was trained
        recorded = {**record["settings"], "mlflow": params.mlflow.model_dump(mode="json")}
        settings = params_from_mapping(recorded, f"{ft.lineage} (the settings {network} was trained with)")
    except (KeyError, TypeError, ConfigError) as exc:
        raise TrainingError(f"{ft.lineage}: its settings cannot be read ({exc}); rerun `cass finetune`") from None
    metrics = json.loads(layout.evaluate_metrics(network).read_text())
    return ModelOnDisk(network, lineage, record, settings, metrics)


def logged_pretraining(params: Params, layout: Layout, model: ModelOnDisk) -> str | None:
    """The MLflow run of the pretraining ``model`` started from: the one the fine-tuning recorded, else one
    logged earlier from the same weights, else a run logged now from ``<outputs>/pretrain`` when its weights
    are those the fine-tuning started from (None when they are not: then only their digest is tagged)."""
    from cass.engine import file_digest
    from cass.outputs import PretrainOutputs

    pre = model.record.get("pretraining") or {}
    if pre.get("run_id"):
        return str(pre["run_id"])
    digest, network = pre.get("weights_sha256"), model.network
    if not digest:
        return None
    found = latest_run_id(params.mlflow, f"tags.pretrain_{network}_sha256 = '{digest}'")
    if found:
        return found
    out = PretrainOutputs(layout.pretrain)
    if not out.weights(network).is_file() or file_digest(out.weights(network)) != digest:
        log.warning("%s: the pretraining on disk is not the one %s was fine-tuned from; its run is not linked "
                    "(the version carries the pretrained weights' digest)", out.out_dir, network)
        return None
    recorded = json.loads(out.metrics.read_text()) if out.metrics.is_file() else {}
    lineage = LineageTags(model.lineage.dataset, model.lineage.label_fraction,  # the commit pretraining ran at
                      str(recorded.get("git_commit") or model.lineage.git_commit),
                      str(recorded.get("data_version") or model.lineage.data_version), model.lineage.test_set)
    digests = {f"pretrain_{n}_sha256": file_digest(out.weights(n)) for n in ("cnn", "vit") if out.weights(n).is_file()}
    with open_run(params, layout, model, "pretrain", network="cnn+vit", lineage=lineage, stage="pretrain",
                  **digests) as run:
        if out.history.is_file():
            run.history(out.history)
        run.training_stage(out.out_dir, out.metrics, out.history, "pretraining")
        run.artifact(out.networks)
    return run.run_id


@contextlib.contextmanager
def open_run(params: Params, layout: Layout, model: ModelOnDisk, what: str, *, network: str | None = None,
             lineage: LineageTags | None = None, **tags: str | None) -> Iterator[RunLogger]:
    """A run for a model on disk, read like a pipeline's stage run: named ``<what> <label>`` (the data it
    was trained on and the settings in which it differs from ``params``, :func:`~cass.tracking.tags.label_of`),
    its lineage tags (or ``lineage``'s), the settings it was trained with and the dataset input."""
    import mlflow

    lineage = lineage or model.lineage
    label = label_of(model.settings, layout.data, lineage.data_version, base=params)
    all_tags = run_tags(lineage.tags(network or model.network, **tags))
    with mlflow.start_run(run_name=run_name(what, label), tags=all_tags) as active:
        run = RunLogger(params.mlflow, active.info.run_id)
        run.params(model.settings)
        run.dataset(layout.data, model.settings.data.name, data_digest(layout.data, lineage.data_version), "training")
        yield run


def register_outputs(
    params: Params, layout: Layout, networks: Sequence[Network], gate: registry.ModelGate | None = None,
    policy: GatePolicy | None = None,
) -> dict:
    """Log fine-tuned models already on disk (``cass finetune`` + ``cass evaluate``) and register them.

    For stage runs made outside a tracked pipeline (e.g. by ``dvc repro``). Everything logged comes from the
    files beside the model, never from the current settings: the settings it was trained with (tuned values
    included) and its commit and data version from ``finetune/<net>/lineage.json``, its per-epoch curves from
    ``history.csv``, a link to its pretraining run. The model gate (the current ``quality:`` floors) runs
    first: with ``quality.model_gate_policy: per_network`` each passing network is registered and a failed
    one is not; with ``all`` nothing is registered unless every network passes. Any refusal raises
    :class:`cass.errors.GateFailed` once the passing networks are registered, naming them. One run per
    network holds the fine-tuning files, the model and the evaluation; returns ``{network: ModelVersion}``.
    """
    from cass.errors import GateFailed
    from cass.serving import log_classifier

    cfg = params.mlflow
    models = {network: model_on_disk(params, layout, network) for network in networks}
    check = gate or registry.default_gate(params)
    verdicts = {network: check(model.metrics) for network, model in models.items()}
    refused = {network: v for network, v in verdicts.items() if not v.passed}
    passed = [network for network in networks if network not in refused]
    if refused and (params.quality.model_gate_policy == "all" or not passed):
        raise GateFailed(refused_summary(params, refused, passed, {}))
    configure(cfg)
    example = first_test_image(layout.data)
    versions = {}
    for network in passed:
        model = models[network]
        ft = FinetuneOutputs(layout.finetune(network))
        pretraining_run_id = logged_pretraining(params, layout, model)
        with open_run(params, layout, model, f"register-{network}", stage="register",
                      pretraining_run_id=pretraining_run_id) as run:
            run.text(yaml.safe_dump(redact_mapping(model.settings.model_dump(mode="json")), sort_keys=False),
                     "params.resolved.yaml")
            run.history(ft.history)
            run.training_stage(ft.out_dir, ft.metrics, ft.history, f"fine-tuning {network}")
            logged = with_retries(f"logging the {network} model", lambda ft=ft: log_classifier(ft.out_dir, example),
                                  cfg)
            metrics = run.evaluation(layout.evaluate(network), logged.model_id)
            manifest = keep_manifest(run, layout.data)
            data_change(params, layout, network, run.run_id)  # before registering: the model card shows it
            candidate = registry.Candidate(
                network=network,
                model_uri=logged.model_uri,
                metrics=metrics,
                tags=model.lineage.tags(network, finetune_run_id=run.run_id, evaluation_run_id=run.run_id,
                                        pretraining_run_id=pretraining_run_id, manifest_sha256=manifest),
                gate=verdicts[network],
            )
            versions[network] = registry.register(model.settings, candidate, policy=policy)
    if refused:
        raise GateFailed(refused_summary(params, refused, passed, versions))
    return versions


def refused_summary(params: Params, refused: Mapping[str, registry.GateVerdict], passed: Sequence[str],
                    versions: Mapping[str, Any]) -> str:
    """What a registration refused and what it registered: one line per network."""
    lines = [registry.refusal(params, network, verdict) for network, verdict in refused.items()]
    for network in passed:
        name = registry.model_name(params.mlflow, network)
        if network in versions:
            lines.append(f"{name}: passed the model gate, registered as version {versions[network].version}")
        else:
            lines.append(f"{name}: passed the model gate, not registered (quality.model_gate_policy: all)")
    return "\n".join(lines)
