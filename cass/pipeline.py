"""The stages of a retraining run, declared once and in order, and the one runner that calls them.

    check MLflow -> [dvc pull] -> prepare -> nothing changed? -> start MLflow run -> data gate -> [pretrain]
      -> [tune <net>] -> fine-tune <net> -> evaluate <net> -> model gate -> log quality reports
      -> register <net> -> promote <net> -> finish MLflow run

:data:`STAGES` is that list: each :class:`Stage` names itself, says when it applies (pretraining only
when ``finetune.init`` is ``cass``, tuning only when the run tunes, :func:`cass.stages.tunes`; MLflow steps
only in a tracked run) and holds the function that runs it. The training stages call their one entry point
in :mod:`cass.stages` with the run's tracker (:attr:`PipelineRun.tracker`): MLflow in a tracked run, the
no-op tracker otherwise; no stage branches on it. :func:`run_stages` walks it, and three callers run it:

- :func:`run_pipeline`: untracked, in this process (``cass demo --no-mlflow``);
- :func:`run_pipeline_with_mlflow`: MLflow runs, registration and promotion, in this process (``cass demo --no-flow``);
- the Prefect flow ``flows/retrain.py``: the same runner with each stage a task (retries on I/O only,
  fine-tunings side by side on a GPU).

``dvc.yaml`` is generated from this list and the settings (:mod:`cass.dvc_yaml`, ``cass dvc-yaml``): its
stages are those of :data:`STAGES` with a ``dvc`` name that the settings run, each a CLI command (``cass
data prepare``, ``cass validate``, ``cass pretrain``, ``cass tune``, ``cass finetune``, ``cass evaluate``)
that calls the entry point the stage here calls. Stages hand each other plain values (paths, run ids,
metrics) in a :class:`PipelineRun`, never models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass import tracking
from cass.config import Network, Params
from cass.errors import ConfigError, GateFailed, VersioningError
from cass.outputs import Layout
from cass.run_keys import COMPLETED, OUTCOME_TAG, RUN_KEY_TAG, run_key
from cass.stages import (
    Evaluation,
    FinetuneRun,
    StageRun,
    evaluate_stage,
    finetune_stage,
    needs_pretraining,
    pretrain_dir,
    pretrain_stage,
    tune_stage,
)
from cass.tracker import NO_TRACKER, Tracker

if TYPE_CHECKING:
    from cass.quality import GateResult
    from cass.registry import PromotionResult

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The gates


def ensure_demo_data(params: Params) -> None:
    """Generate the embedded demo dataset at ``data.root`` when the settings point at it."""
    from cass.data.demo import generate_demo

    d = params.data
    if d.name == "demo" and d.layout == "imagefolder":
        generate_demo(Path(d.root), d.demo_images_per_class, d.demo_image_size, kind=d.demo_kind)


def validate_data(params: Params, layout: Layout) -> None:
    """The data gates, manifest then splits; :class:`cass.errors.GateFailed` stops the run before any training.

    Both run before pretraining (not only the split gate before fine-tuning): pretraining reads the splits too.
    """
    from cass.quality import validate_manifest, validate_splits

    validate_manifest(params, layout.data, layout.quality("manifest"), cache_path=layout.decode_cache)
    validate_splits(params, layout.data, layout.quality("splits"))


def model_gate(params: Params, layout: Layout, network: Network, report_root: Path | None = None) -> GateResult:
    """The model gate on ``network``'s test metrics (``<outputs>/evaluate/<network>/metrics.json``).

    The one way every caller (the stages here, ``cass validate model``) applies it; the report goes to
    ``<report_root>/<network>``, by default ``<outputs>/quality/model/<network>``. Returns the result
    without raising: a caller decides whether a failure stops it.
    """
    from cass.quality import validate_model

    report = (report_root or layout.quality("model")) / network
    return validate_model(params, layout.evaluate_metrics(network), report, raise_on_failure=False)


class ModelGateFailed(GateFailed):
    """The model gate failed for one or more networks; ``failed`` holds each ``(network, GateResult)``."""

    failed: tuple[tuple[str, GateResult], ...] = ()


# --------------------------------------------------------------------------------------------------
# What the stages share


@dataclass(frozen=True)
class PipelineRun:
    """One run of the stages: its settings, where its outputs go, and what earlier stages returned.

    Frozen and made of plain values, so that a Prefect task can take it as its input; the runner hands
    each stage the run as it stands and keeps the stage's result in a new copy.
    """

    params: Params
    layout: Layout = Layout()
    tracked: bool = False  # MLflow runs, then registration and promotion
    register: bool = True
    promote: bool = True
    tuning: bool = False  # the caller's decision, by cass.stages.tunes (tune.enabled, or --tune-trials)
    force: bool = False  # train even when a completed run had the same data and settings
    reuse_pretraining: bool = True  # False (--force): pretrain again even when a finished one has these settings
    data_version: str | None = None  # a git revision whose data.dvc names the data to pull first
    params_file: Path | None = None
    run_tags: Mapping[str, str] = field(default_factory=dict)  # extra tags on the MLflow parent run
    progress: bool = True  # progress bars of the training stages
    # What the stages returned, in their order
    run_key: str | None = None
    earlier_run_id: str | None = None  # a completed run with the same run key: nothing to train
    run_id: str | None = None  # the MLflow parent run
    pretraining: StageRun | None = None
    best_params: Mapping[Network, str] = field(default_factory=dict)
    finetuned: Mapping[Network, FinetuneRun] = field(default_factory=dict)
    evaluations: Mapping[Network, Evaluation] = field(default_factory=dict)
    versions: Mapping[Network, str] = field(default_factory=dict)
    promotions: Mapping[Network, PromotionResult] = field(default_factory=dict)
    gate_failures: Mapping[Network, GateResult] = field(default_factory=dict)  # networks the model gate stopped
    data_changes: Mapping[Network, Any] = field(default_factory=dict)  # cass.tracking.DataChange or None

    @property
    def networks(self) -> tuple[Network, ...]:
        return tuple(self.params.finetune.networks)

    @property
    def pretrain_dir(self) -> Path | None:
        """The pretrained weights fine-tuning starts from (:func:`cass.stages.pretrain_dir`)."""
        return pretrain_dir(self.params, self.layout)

    @property
    def tracker(self) -> Tracker:
        """What the training stages log through: MLflow, nested under the parent run, in a tracked run; else
        nothing."""
        return tracking.MlflowTracker(self.run_id) if self.tracked else NO_TRACKER

    @property
    def pretraining_run_id(self) -> str | None:
        return self.pretraining.run_id if self.pretraining else None

    @property
    def metrics(self) -> dict[Network, dict]:
        """Test metrics per evaluated network."""
        return {network: dict(e.metrics) for network, e in self.evaluations.items()}


# --------------------------------------------------------------------------------------------------
# The stage functions: (run, network) -> what the stage hands on. ``network`` is None for stages that
# run once. The training stages call their one entry point in cass.stages with the run's tracker.


def _check_tracking(run: PipelineRun, _: None) -> str:
    """The tracking store answers (a server within mlflow.server_timeout_s) and the experiment exists."""
    return tracking.configure(run.params.mlflow)


def _pull_data(run: PipelineRun, _: None) -> str:
    """The dataset of ``data_version``: its data.dvc from git, then ``dvc pull`` (a checked remote)."""
    from cass import versioning

    revision = run.data_version
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


def _prepare(run: PipelineRun, _: None) -> str:
    """Manifest, splits and subsets (the demo data is generated first); returns the run key."""
    from cass.data.prepare import prepare_data

    ensure_demo_data(run.params)
    prepare_data(run.params, run.layout.data)
    return run_key(run.params, run.layout.data, tuning=run.tuning)


def _find_unchanged(run: PipelineRun, _: None) -> str | None:
    """A completed pipeline run with the same run key (data and result-changing settings), if any."""
    return tracking.completed_run(run.params, run.run_key)


def _start_run(run: PipelineRun, _: None) -> str:
    tags = {RUN_KEY_TAG: run.run_key, **run.run_tags}
    return tracking.start_pipeline_run(run.params, run.layout, params_file=run.params_file, tags=tags)


def _data_gate(run: PipelineRun, _: None) -> None:
    validate_data(run.params, run.layout)


def _pretrain(run: PipelineRun, _: None) -> StageRun:
    """CASS pretraining; a tracked run reuses a finished pretraining with the same settings and data."""
    return pretrain_stage(run.params, run.layout, run.tracker, resume=run.reuse_pretraining, progress=run.progress)


def with_study_suffix(params: Params, key: str) -> Params:
    """One Optuna study per run key: trials of other settings or data never mix (cass.tuning refuses them)."""
    name = f"{params.tune.study_name}-{key[:12]}"
    return params.model_copy(update={"tune": params.tune.model_copy(update={"study_name": name})})


def _tune(run: PipelineRun, network: Network) -> str:
    """The Optuna search of one network; a tracked run nests its study's MLflow run under the pipeline run."""
    return str(tune_stage(with_study_suffix(run.params, run.run_key), run.layout, network, run.tracker))


def _finetune(run: PipelineRun, network: Network) -> FinetuneRun:
    """Fine-tune ``network``, with the best settings tuning found when it ran (its run tags which, its
    lineage.json records the tuning)."""
    return finetune_stage(run.params, run.layout, network, run.tracker, best_params=run.best_params.get(network),
                          pretraining_run_id=run.pretraining_run_id, progress=run.progress)


def _evaluate(run: PipelineRun, network: Network) -> Evaluation:
    return evaluate_stage(run.params, run.layout, network, run.tracker, finetuned=run.finetuned.get(network),
                          pretraining_run_id=run.pretraining_run_id)


def _model_gate(run: PipelineRun, _: None) -> dict[Network, GateResult]:
    """The model gate on every network; returns the failed ones.

    In a run that registers, ``quality.model_gate_policy`` decides what a failure stops: ``per_network``
    (default) registers and promotes each network that passed and skips the others; ``all``, or no network
    passing, stops the run (nothing is registered or promoted). A run that registers nothing only warns."""
    results = {network: model_gate(run.params, run.layout, network) for network in run.networks}
    failed = {network: result for network, result in results.items() if not result.success}
    if not failed:
        return {}
    passed = [network for network in run.networks if network not in failed]
    registering = run.tracked and run.register
    if registering and (run.params.quality.model_gate_policy == "all" or not passed):
        held = (f"\n{', '.join(passed)} passed, but quality.model_gate_policy is 'all'" if passed else "")
        error = ModelGateFailed("\n".join(f"{network}: {r.summary()}" for network, r in failed.items())
                                + held + "\nnothing was registered or promoted", next(iter(failed.values())))
        error.failed = tuple(failed.items())
        raise error
    for result in failed.values():
        log.warning("%s", result.summary())
    if registering:
        log.warning("model gate: %s failed and will not be registered or promoted; %s passed and go on",
                    ", ".join(failed), ", ".join(passed))
    return failed


def gate_failure(run: PipelineRun) -> ModelGateFailed | None:
    """After a run that registered the networks that passed the model gate, the error that reports the ones
    that did not, naming what passed and what became of it (registered version, promotion); None when every
    network passed."""
    if not run.gate_failures:
        return None
    lines = [f"{network}: not registered or promoted, {r.summary()}" for network, r in run.gate_failures.items()]
    for network in run.networks:
        if network in run.gate_failures:
            continue
        line = f"{network}: passed the model gate"
        if network in run.versions:
            line += f", registered as version {run.versions[network]}"
        if network in run.promotions:
            line += f"; {run.promotions[network].summary()}"
        lines.append(line)
    error = ModelGateFailed("\n".join(lines), next(iter(run.gate_failures.values())))
    error.failed = tuple(run.gate_failures.items())
    return error


def _log_quality(run: PipelineRun, _: None) -> None:
    tracking.log_quality(run.params, run.layout, run.run_id)


def _data_change(run: PipelineRun, network: Network) -> Any:
    """Why it retrained: the data-change report against the champion's data version, logged to the evaluation
    run before registration so that the version's model card holds it (None: no champion, or the same data)."""
    evaluation = run.evaluations[network].candidate.tags["evaluation_run_id"]
    return tracking.data_change(run.params, run.layout, network, evaluation)


def _register(run: PipelineRun, network: Network) -> str:
    from cass.outputs import RESULT_FILE
    from cass.quality.policy import RUN_SETTINGS, GateVerdict, committed_policy

    # The model gate stage passed this network (a failed one is skipped): registration takes its verdict, with
    # the thresholds it used, instead of running it again.
    result = json.loads((run.layout.quality("model") / network / RESULT_FILE).read_text())
    verdict = GateVerdict.from_result(result, run.params.quality, RUN_SETTINGS)
    candidate = replace(run.evaluations[network].candidate, gate=verdict)
    policy = committed_policy(run.params_file, run.params)
    return tracking.register_candidate(run.params, candidate, run.run_id, policy=policy)


def _promote(run: PipelineRun, network: Network) -> PromotionResult:
    from cass.quality.policy import committed_policy

    policy = committed_policy(run.params_file, run.params)
    return tracking.promote_candidate(run.params, network, run.versions[network], run.run_id, policy=policy)


def _finish_run(run: PipelineRun, _: None) -> None:
    """End the parent run FINISHED; ``outcome=completed`` (what the "nothing changed" check looks for)
    once every network was registered and its promotion decided. A network that failed the model gate is
    named in the ``model_gate_failed`` tag (and the run is not completed, so a rerun tries again)."""
    if run.gate_failures:
        tags = {"model_gate_failed": ",".join(run.gate_failures)}
    else:
        tags = {OUTCOME_TAG: COMPLETED} if run.register and run.promote else {}
    tracking.end_pipeline_run(run.params, run.run_id, "FINISHED", tags)


# --------------------------------------------------------------------------------------------------
# The list


def _always(run: PipelineRun) -> bool:
    return True


def _tracked(run: PipelineRun) -> bool:
    return run.tracked


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    ``keep`` names the :class:`PipelineRun` field that receives the result (a mapping by network for a
    per-network stage). ``io`` steps talk to MLflow, S3 or DVC: only they are retried (by the flow), as a
    training step that failed for a real reason would only fail again. ``parallel`` steps may run their
    networks at the same time; ``shown`` steps get a numbered progress line (bookkeeping steps do not).
    ``dvc`` names the stage's stage in ``dvc.yaml``, which :mod:`cass.dvc_yaml` generates from this list
    (the steps without one run only in the flow and ``cass demo``).
    """

    name: str
    run: Callable[[PipelineRun, Network | None], Any]
    keep: str | None = None
    when: Callable[[PipelineRun], bool] = _always
    per_network: bool = False
    io: bool = False
    parallel: bool = False
    shown: bool = True
    gated: bool = False
    dvc: str | None = None

    def label(self, network: Network | None) -> str:
        return f"{self.name} {network}" if network else self.name


STAGES: tuple[Stage, ...] = (
    Stage("check MLflow", _check_tracking, when=_tracked, io=True, shown=False),
    Stage("dvc pull", _pull_data, when=lambda run: bool(run.data_version), io=True),
    Stage("prepare", _prepare, keep="run_key", dvc="prepare"),
    Stage("find an unchanged run", _find_unchanged, keep="earlier_run_id",
          when=lambda run: run.tracked and not run.force, io=True, shown=False),
    Stage("start MLflow run", _start_run, keep="run_id", when=_tracked, io=True, shown=False),
    Stage("data gate", _data_gate, dvc="validate_data"),
    Stage("pretrain", _pretrain, keep="pretraining", when=lambda run: needs_pretraining(run.params), dvc="pretrain"),
    Stage("tune", _tune, keep="best_params", when=lambda run: run.tuning, per_network=True, dvc="tune"),
    Stage("fine-tune", _finetune, keep="finetuned", per_network=True, parallel=True, dvc="finetune"),
    Stage("evaluate", _evaluate, keep="evaluations", per_network=True, dvc="evaluate"),
    Stage("model gate", _model_gate, keep="gate_failures", dvc="model_gate"),
    Stage("log quality reports", _log_quality, when=_tracked, io=True, shown=False),
    Stage("data change", _data_change, keep="data_changes", when=lambda run: run.tracked and run.register,
          per_network=True, io=True, shown=False, gated=True),
    Stage("register", _register, keep="versions", when=lambda run: run.tracked and run.register,
          per_network=True, io=True, gated=True),
    Stage("promote", _promote, keep="promotions", when=lambda run: run.tracked and run.register and run.promote,
          per_network=True, io=True, gated=True),
    Stage("finish MLflow run", _finish_run, when=_tracked, io=True, shown=False),
)


def plan(run: PipelineRun) -> list[Stage]:
    """The stages that apply to ``run``, in order."""
    return [stage for stage in STAGES if stage.when(run)]


def progress_lines(run: PipelineRun) -> list[str]:
    """The numbered progress lines of ``run``, in order ("[4/10] fine-tune cnn")."""
    labels = [stage.label(network) for stage in plan(run) if stage.shown for network in _networks(stage, run)]
    return [f"[{i}/{len(labels)}] {label}" for i, label in enumerate(labels, 1)]


def _networks(stage: Stage, run: PipelineRun) -> Sequence[Network | None]:
    return run.networks if stage.per_network else (None,)


# --------------------------------------------------------------------------------------------------
# The runner


Execute = Callable[[Stage, PipelineRun, Sequence[Network | None], Callable[[Network | None], None]], list[Any]]
"""Runs one stage for the given networks, calling ``started(network)`` as each starts, and returns their
results in order. The flow's runs each as a Prefect task; a ``parallel`` stage is handed all its networks
at once, so that it may run them side by side."""


def call(
    stage: Stage, run: PipelineRun, networks: Sequence[Network | None], started: Callable[[Network | None], None]
) -> list[Any]:
    """Run a stage in this process, one network after the other."""
    results = []
    for network in networks:
        started(network)
        results.append(stage.run(run, network))
    return results


def run_stages(
    run: PipelineRun, execute: Execute = call, on_stage: Callable[[str], None] = lambda line: None
) -> PipelineRun:
    """Run the stages of :func:`plan` in order; returns the run with every stage's result.

    ``on_stage`` gets the numbered progress line of each shown step as it starts. Stops early, training
    nothing, when a completed run had the same run key (``earlier_run_id``). Once the MLflow parent run
    exists, any failure ends it FAILED (KILLED on Ctrl-C), with the gate reports logged when a gate
    stopped it; nothing after the failed stage (registration, promotion) runs.
    """
    lines = iter(progress_lines(run))
    try:
        for stage in plan(run):
            started = (lambda network: on_stage(next(lines))) if stage.shown else (lambda network: None)
            networks = _networks(stage, run)
            skipped = set(run.gate_failures) if stage.gated else set()
            batches = [networks] if stage.parallel else [[network] for network in networks]
            results, ran = [], []
            for batch in batches:
                for network in (n for n in batch if n in skipped):  # a network the model gate stopped
                    if stage.shown:
                        on_stage(f"{next(lines)}: skipped, {network} failed the model gate")
                batch = [n for n in batch if n not in skipped]
                if batch:
                    results += execute(stage, run, batch, started)
                    ran += batch
            run = _keep(run, stage, ran, results)
            if run.earlier_run_id is not None:  # nothing changed since a completed run: nothing to train
                return run
    except BaseException as exc:
        if run.run_id is not None:
            _end_failed(run, exc)
        raise
    return run


def _keep(run: PipelineRun, stage: Stage, networks: Sequence[Network | None], results: list[Any]) -> PipelineRun:
    if stage.keep is None:
        return run
    if stage.per_network:
        return replace(run, **{stage.keep: {**getattr(run, stage.keep), **dict(zip(networks, results, strict=True))}})
    return replace(run, **{stage.keep: results[0]})


def _end_failed(run: PipelineRun, exc: BaseException) -> None:
    with contextlib.suppress(Exception):  # the error that stopped the run is what the user must see
        if isinstance(exc, GateFailed):
            tracking.log_quality(run.params, run.layout, run.run_id)
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        tracking.end_pipeline_run(run.params, run.run_id, status)


# --------------------------------------------------------------------------------------------------
# The callers in this process


def run_pipeline(
    params: Params,
    layout: Layout = Layout(),
    *,
    progress: bool = True,
    on_stage: Callable[[str], None] = lambda line: None,
    tuning: bool = False,
) -> dict[Network, dict]:
    """prepare -> data gate -> pretrain -> [tune] -> fine-tune and evaluate each network, without MLflow;
    returns the test metrics per network. The model gate only warns: nothing is registered after it.
    ``tuning``: search each network's settings first (trials logged nowhere)."""
    run = PipelineRun(params, layout, progress=progress, tuning=tuning)
    return run_stages(run, on_stage=on_stage).metrics


@dataclass(frozen=True)
class TrackedPipeline:
    run_id: str
    results: dict[Network, dict]
    versions: dict[Network, str]
    promotions: dict[Network, Any]
    pretraining: StageRun | None = None
    failure: ModelGateFailed | None = None  # the networks the model gate kept out of the registry, if any


def run_pipeline_with_mlflow(
    params: Params,
    layout: Layout,
    *,
    params_file: Path | None = None,
    register: bool = True,
    promote: bool = True,
    progress: bool = True,
    on_stage: Callable[[str], None] = lambda line: None,
    force: bool = False,
    tuning: bool = False,
) -> TrackedPipeline:
    """The stages logged to MLflow in this process, then registration and promotion of each network that
    passed the model gate (``failure`` reports the others; the caller decides how to end).

    The Prefect flow's code path without Prefect (tuning only when ``tuning``): the tracking store is checked
    before anything is prepared, ``params.yaml`` uploaded before anything is trained, and any failure (an
    upload that failed every retry, a gate) ends the runs FAILED before registration, so the champion is
    untouched. Unlike the flow it always trains: it does not look for an unchanged completed run; it reuses
    a finished pretraining with the same settings and data unless ``force``.
    """
    run = PipelineRun(params, layout, tracked=True, register=register, promote=promote, force=True,
                      reuse_pretraining=not force, params_file=params_file, progress=progress, tuning=tuning)
    done = run_stages(run, on_stage=on_stage)
    return TrackedPipeline(done.run_id, done.metrics, dict(done.versions), dict(done.promotions), done.pretraining,
                           gate_failure(done))
