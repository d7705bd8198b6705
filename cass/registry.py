"""The model registry: ``<prefix>-cnn`` and ``<prefix>-vit``, and promotion by moving the ``champion`` alias.

A version becomes champion only when the model quality gate passes and it beats the current champion
on the SAME test set (same test-split hash) by ``mlflow.promotion_margin`` in ``mlflow.promotion_metric``.
Aliases keep no history, so every decision (promoted, refused, restored by a rollback) is recorded on its
version as one JSON tag ``promotion.<n>``, ``n`` numbering the decisions of the registered model in order,
written BEFORE the alias moves; :func:`cass.champion_history.history` reads them back. Summary tags follow
(``promoted_at``, ``previous_champion``, ``compared_metrics``, ``promotion_reason``, or ``promotion_refused_*``).
``rollback`` moves the alias back to the champion the current one replaced.

Two promotions of one model never interleave: each holds a lock while it reads the champion, decides
and moves the alias, so the others wait and then compare against the new champion. The lock is
``<name>.promotion-lock``, a :mod:`cass.mutex` lock (a registered model created and deleted around the
decision; a dead holder's lock is broken, see there), waited for ``mlflow.lock_timeout_s`` and taken for
stale after ``mlflow.lock_stale_s``. The champion alias and the decision records are read and written by
:mod:`cass.champion_history`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cass import model_card
from cass.champion_history import (
    CHAMPION,
    Decision,
    complete_flat_tags,
    current_champion,
    history,
    mlflow_client,
    promotion_tags,
    registry_errors,
    restore_tags,
    set_tags,
    write_record,
)
from cass.config import MlflowConfig, Params
from cass.errors import ConfigError, GateFailed, RegistryError
from cass.mutex import LockTimeout, registered_model_lock
from cass.names import PROMOTION_METRICS
from cass.outputs import METRICS_FILE
from cass.quality.policy import GatePolicy, GateVerdict, ModelGate, default_gate, under_policy

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"

# Where a version's evaluation run keeps its test metrics: :mod:`cass.tracking` logs them there and the
# promotion reads them back, so both sides take the path from here.
EVALUATION_DIR = "evaluation"
METRICS_ARTIFACT = f"{EVALUATION_DIR}/{METRICS_FILE}"


def model_name(cfg: MlflowConfig, network: str) -> str:
    return f"{cfg.model_prefix}-{network}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def finite(value: Any) -> bool:
    """A metric value MLflow can store and a promotion can compare: a finite number, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# The model quality gate


# The gate itself (default_gate), its verdict (GateVerdict) and the committed policy: cass.quality.policy.


# --------------------------------------------------------------------------------------------------
# Registration


@dataclass(frozen=True)
class Candidate:
    """A logged model and what registration needs to describe it.

    ``gate``: the model gate's verdict on ``metrics`` when the caller already ran it (the pipeline's model
    gate stage); None makes :func:`register` run it.
    """

    network: str
    model_uri: str
    metrics: Mapping[str, Any]
    tags: Mapping[str, str] = field(default_factory=dict)
    gate: GateVerdict | None = None


GATE_TAG = "model_gate"
GATE_RECORD_TAG = "model_gate_record"
"""The version's one gate verdict (JSON, :meth:`GateVerdict.record`); ``model_gate`` is its text."""


def gate_candidate(params: Params, candidate: Candidate, gate: ModelGate | None = None) -> GateVerdict:
    """The verdict the caller recorded on ``candidate``, else the model gate run on its test metrics now."""
    if candidate.gate is not None:
        return candidate.gate
    return (gate or default_gate(params))(candidate.metrics)


def refusal(params: Params, network: str, verdict: GateVerdict) -> str:
    """Why a network was not registered: its failed checks and what to do."""
    return (f"{model_name(params.mlflow, network)}: not registered, model gate {verdict.text()} (floors in the "
            "quality: settings, docs/quality.md); train a better model, or change the floors deliberately")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if finite(v) else "n/a"


def describe_version(params: Params, candidate: Candidate) -> str:
    m, t = candidate.metrics, candidate.tags
    arch = m.get("arch") or t.get("arch", "?")
    init = {
        "cass": "CASS self-supervised pretraining (CNN and ViT trained together without labels)",
        "random": "random initialisation",
        "weights": "the given model.*_weights",
    }[params.finetune.init]
    return (
        f"{arch} ({candidate.network}) started from {init} and fine-tuned with focal loss on "
        f"{float(t.get('label_fraction', params.finetune.label_fraction)):.0%} of the labelled training images of "
        f"dataset '{t.get('dataset', params.data.name)}' (data version {t.get('data_version', 'untracked')}). "
        f"Test split of {m.get('num_samples', '?')} images (hash {t.get('test_set', '?')[:12]}): macro F1 "
        f"{_fmt(m.get('macro_f1'))}, balanced accuracy {_fmt(m.get('balanced_accuracy'))}, macro AUROC "
        f"{_fmt(m.get('macro_auroc'))}. Git commit {t.get('git_commit', 'unknown')}; evaluation run "
        f"{t.get('evaluation_run_id', '?')}. Input: a column 'image' of encoded image bytes; output: one "
        "probability column per class."
    )


def describe_model(params: Params, network: str) -> str:
    other = "ViT" if network == "cnn" else "CNN"
    arch = params.model.cnn if network == "cnn" else params.model.vit
    return (
        f"The {network.upper()} of CASS (Cross-Architectural Self-Supervision): {arch}, pretrained together with a "
        f"{other} without labels, then fine-tuned with few labels, on dataset '{params.data.name}'. Each version "
        "carries its test metrics, data version and test-set hash as tags; the 'champion' alias is the version "
        "in production (moved only by `cass promote` / `cass rollback`, which record why)."
    )


def register(params: Params, candidate: Candidate, client=None, gate: ModelGate | None = None,
             policy: GatePolicy | None = None):
    """Register ``candidate`` as a new version of ``<prefix>-<network>``; returns the ModelVersion.

    Only a model that passes the model gate enters the registry: the verdict is the candidate's own (the
    pipeline's gate stage), else the gate runs here; a failed gate raises :class:`cass.errors.GateFailed`
    and registers nothing. With ``policy`` (the committed one, cass.quality.policy) the verdict also says
    whether the policy passes it. The verdict is recorded once, ``model_gate_record``; the ``model_gate``
    tag, the model card and the log line are rendered from it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    verdict = gate_candidate(params, candidate, gate)
    if not verdict.passed:
        raise GateFailed(refusal(params, candidate.network, verdict))
    verdict = under_policy(params, verdict, candidate.metrics, policy)
    candidate = replace(candidate, gate=verdict)
    client = client or mlflow_client()
    name = model_name(params.mlflow, candidate.network)
    tags = {**candidate.tags, GATE_TAG: verdict.text()[:7900],  # MLflow keeps up to 8000 characters
            GATE_RECORD_TAG: json.dumps(verdict.record(), sort_keys=True)}
    tags.update({f"test_{k}": f"{candidate.metrics[k]:.6g}" for k in PROMOTION_METRICS
                 if finite(candidate.metrics.get(k))})
    try:
        mv = mlflow.register_model(candidate.model_uri, name, tags=tags)
        client.update_model_version(name, mv.version, description=describe_version(params, candidate))
        client.update_registered_model(name, description=describe_model(params, candidate.network))
        model_card.attach(params, candidate, name, mv.version, client, describe_version(params, candidate))
    except MlflowException as exc:
        raise RegistryError(f"registering {candidate.model_uri} as {name} failed: {exc.message}") from None
    log.log(logging.WARNING if verdict.lowered else logging.INFO, "registered %s version %s; model gate %s", name,
            mv.version, verdict.text())
    return mv


def register_once(params: Params, candidate: Candidate, client=None, gate: ModelGate | None = None,
                  policy: GatePolicy | None = None):
    """:func:`register`, safe to retry: a version already registered from the same evaluation run (the
    answer lost on the way back) is found and completed, not registered twice. Returns the ModelVersion."""
    client = client or mlflow_client()
    name = model_name(params.mlflow, candidate.network)
    evaluation = candidate.tags.get("evaluation_run_id")
    done = [v for v in client.search_model_versions(f"name = '{name}'")
            if evaluation and v.tags.get("evaluation_run_id") == evaluation]
    if not done:
        return register(params, candidate, client, gate, policy)
    mv = done[0]
    if not mv.description:
        client.update_model_version(name, mv.version, description=describe_version(params, candidate))
    if model_card.CARD_TAG not in mv.tags:  # the card failed after the version was created
        recorded = mv.tags.get(GATE_RECORD_TAG)
        if recorded:  # the card says what the version's record says
            candidate = replace(candidate, gate=GateVerdict.from_record(json.loads(recorded)))
        model_card.attach(params, candidate, name, mv.version, client, describe_version(params, candidate))
    return mv


def version_metrics(client, name: str, version: str) -> dict:
    """The test metrics of a version: the metrics.json its evaluation run logged."""
    import mlflow

    mv = client.get_model_version(name, version)
    run_id = mv.tags.get("evaluation_run_id")
    if not run_id:
        raise RegistryError(f"{name} version {version} has no evaluation_run_id tag; register it with `cass register`")
    with tempfile.TemporaryDirectory(prefix="cass-metrics-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=METRICS_ARTIFACT, dst_path=tmp)
        return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------------
# The lock


@contextlib.contextmanager
def promotion_lock(client, name: str, cfg: MlflowConfig) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` for the block: one promotion or rollback of ``name`` at a time."""
    try:
        with registered_model_lock(
            client, f"{name}{LOCK_SUFFIX}", timeout_s=cfg.lock_timeout_s, stale_s=cfg.lock_stale_s,
            held_by=f"another promotion of {name}",
            description=f"Held while a promotion of {name} decides; deleted afterwards.",
        ):
            yield
    except LockTimeout as exc:
        raise RegistryError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# Promotion and rollback


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: str
    promoted: bool
    champion: str | None  # the champion after the decision
    previous: str | None  # the champion before it
    reason: str
    forced: bool = False
    compared: Mapping[str, Any] = field(default_factory=dict)
    gate_report: str = ""  # where the model gate's report of this decision is kept (a runs:/ URI)

    def summary(self) -> str:
        report = f"; gate report: {self.gate_report}" if self.gate_report else ""
        if self.promoted:
            return f"{self.name} v{self.version}: promoted to champion ({self.reason}){report}"
        kept = f"v{self.champion}" if self.champion else "none"
        return f"{self.name} v{self.version}: not promoted, champion stays {kept} ({self.reason}){report}"

    def change(self) -> str:
        """``champion v1 -> v2``, or ``first champion v1``."""
        was = f"champion v{self.previous} -> " if self.previous else "first champion "
        return f"{self.name}: {was}v{self.champion}"


GATE_REPORTS = "promotion_gate"
"""Folder of a version's evaluation run where each promotion attaches its model gate report."""


def _attach_report(client, run_id: str, report: Path | None) -> str:
    """Log the gate's report folder to the version's evaluation run; returns the URI of its Data Docs page."""
    if report is None or not report.is_dir() or not run_id:
        return ""
    folder = f"{GATE_REPORTS}/{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        client.log_artifacts(run_id, str(report), folder)
    except Exception as exc:  # the artifact store's own errors (S3, disk) are not MlflowExceptions
        raise RegistryError(f"attaching the model gate report to run {run_id} failed ({type(exc).__name__}: "
                            f"{str(exc).strip()[:200]}); nothing was decided, the champion is unchanged; retry "
                            "when the artifact store answers") from None
    page = "data_docs/index.html" if (report / "data_docs" / "index.html").is_file() else "result.json"
    return f"runs:/{run_id}/{folder}/{page}"


def _same_test_set(client, name: str, champion: str, candidate) -> bool:
    test_set = candidate.tags.get("test_set")
    return bool(test_set) and test_set == client.get_model_version(name, champion).tags.get("test_set")


def _compare(params: Params, name: str, champion: str, version: str, client, candidate_metrics: Mapping[str, Any]):
    """:func:`cass.comparison.compare_on_unseen`: the shared evaluation, or why the two are not comparable."""
    from cass.comparison import ComparisonError, compare_on_unseen

    try:
        return compare_on_unseen(params, name, champion, version, client, version_metrics(client, name, champion),
                                 candidate_metrics)
    except ComparisonError as exc:
        return f"not compared on shared images: {exc}"


def promote(
    name: str,
    version: str,
    params: Params,
    *,
    force: bool = False,
    reason: str | None = None,
    gate: ModelGate | None = None,
    client=None,
    policy: GatePolicy | None = None,
) -> PromotionResult:
    """Move ``champion`` to ``version`` when the gate passes and it beats the champion by the margin.

    The gate is the one of ``params`` and, with ``policy``, the committed policy's too (cass.quality.policy):
    settings given to a promotion can make the gate stricter, never laxer, and a version that passes only
    under lowered thresholds is refused. ``force`` (with a ``reason``) skips the gate and the comparison; both
    are still recorded. The decision is
    recorded on the version (one tag, ``promotion.<n>``) BEFORE the alias moves, so a process killed at any
    point leaves the old champion, or the new one with its complete record; the summary tags written after
    the move are rewritten from the record by the next promotion or rollback if they are missing.
    """
    if force and not (reason and reason.strip()):
        raise ConfigError("--force needs --reason TEXT: say why the gate or the comparison is overridden")
    client = client or mlflow_client()
    with registry_errors(name, f"promoting v{version}"):
        return _promote(name, str(version), params, force=force, reason=reason, gate=gate, client=client,
                        policy=policy)


def _promote(name: str, version: str, params: Params, *, force: bool, reason: str | None, gate: ModelGate | None,
             client, policy: GatePolicy | None = None) -> PromotionResult:
    from mlflow.exceptions import MlflowException

    cfg = params.mlflow
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"{name} has no version {version}; `cass promote --help` shows how to pick one") from None
    candidate_metrics = version_metrics(client, name, version)
    # Scoring two models on shared images takes a while: done before the lock against the champion of now,
    # and again under the lock only if another promotion moved the champion meanwhile.
    evaluated = current_champion(client, name)
    early = (_compare(params, name, evaluated, version, client, candidate_metrics)
             if evaluated not in (None, version) and not _same_test_set(client, name, evaluated, candidate) else None)

    with tempfile.TemporaryDirectory(prefix="cass-model-gate-") as tmp:  # the gate's report, until attached
        verdict = (gate or default_gate(params, Path(tmp) / "report"))(candidate_metrics)
        verdict = under_policy(params, verdict, candidate_metrics, policy)
        with promotion_lock(client, name, cfg):
            previous = current_champion(client, name)
            _, records = history(name, client)
            complete_flat_tags(client, name, previous, records)
            if previous == version:
                return PromotionResult(name, version, False, previous, previous, "already the champion")
            # Attached once a decision is taken: not for a version that is champion already, nor without the lock.
            gate_report = _attach_report(client, candidate.tags.get("evaluation_run_id") or candidate.run_id,
                                         verdict.report)
            metric = cfg.promotion_metric
            compared: dict[str, Any] = {"metric": metric, "margin": cfg.promotion_margin,
                                        "candidate": candidate_metrics.get(metric), "gate": verdict.text(),
                                        "gate_record": verdict.record(),
                                        "model_card": candidate.tags.get(model_card.CARD_TAG, "")}
            refusal, why = None, "first champion"
            if previous is not None:
                compared["champion_version"] = previous
                same_test_set = _same_test_set(client, name, previous, candidate)
                if not same_test_set:  # tested on other splits: both scored on the images neither has seen
                    shared = (early if previous == evaluated and early is not None
                              else _compare(params, name, previous, version, client, candidate_metrics))
                    if isinstance(shared, str):
                        refusal = shared
                    else:
                        compared.update({"candidate_test_split": compared["candidate"], **shared.record()})
                        refusal, why = shared.verdict(cfg.promotion_margin)
                else:
                    champion_value = version_metrics(client, name, previous).get(metric)
                    compared["champion"] = champion_value
                    value = candidate_metrics.get(metric)
                    if not (finite(value) and finite(champion_value)):
                        refusal = f"{metric} is missing (candidate {value}, champion {champion_value})"
                    elif value - champion_value < cfg.promotion_margin:
                        refusal = (
                            f"{metric} {value:.4f} does not beat champion v{previous} ({champion_value:.4f}) by the "
                            f"margin {cfg.promotion_margin:g}"
                        )
                    else:
                        why = (f"{metric} {value:.4f} beats champion v{previous} ({champion_value:.4f}) by >= "
                               f"{cfg.promotion_margin:g}")
            if not verdict.promotable:
                refusal = f"model gate {verdict.text()}" + ("; promote it only with --force --reason"
                                                            if verdict.lowered else "")
            seq = max((d.seq for d in records), default=0) + 1

            if refusal is not None and not force:
                decision = Decision(seq, version, "refused", _now(), _user(), refusal, previous, None, False, compared,
                                    gate_report)
                write_record(client, name, version, decision)
                set_tags(client, name, version, {
                    "promotion_refused_at": decision.at,
                    "promotion_refused_reason": refusal,
                    "compared_metrics": json.dumps(compared),
                })
                log.info("%s v%s not promoted: %s", name, version, refusal)
                return PromotionResult(name, version, False, previous, previous, refusal, compared=compared,
                                       gate_report=gate_report)

            if force:
                final_reason = (f"forced: {reason.strip()}"
                                + (f" (would have been refused: {refusal})" if refusal else ""))
            else:
                final_reason = f"{why}; model gate {verdict.text()}"
            decision = Decision(seq, version, "promoted", _now(), _user(), final_reason, previous, previous, force,
                                compared, gate_report)
            write_record(client, name, version, decision)  # first: a kill after this point is recoverable
            client.set_registered_model_alias(name, CHAMPION, version)
            set_tags(client, name, version, promotion_tags(decision))
            now = current_champion(client, name)
            if now != version:  # the lock makes this impossible unless someone moved the alias by hand
                raise RegistryError(f"{name}: champion is v{now} right after moving it to v{version}; "
                                    "check who moved it")
    result = PromotionResult(name, version, True, version, previous, final_reason, force, compared, gate_report)
    log.info("%s (%s)", result.change(), final_reason)
    return result


def rollback(name: str, params: Params, *, reason: str, client=None) -> PromotionResult:
    """Move ``champion`` back to the version the current champion replaced (its recorded previous champion).

    As in :func:`promote`, the decision is recorded on the restored version before the alias moves."""
    if not (reason and reason.strip()):
        raise ConfigError("rollback needs --reason TEXT (recorded on both versions)")
    client = client or mlflow_client()
    with registry_errors(name, "rolling back"), promotion_lock(client, name, params.mlflow):
        current = current_champion(client, name)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        _, records = history(name, client)
        complete_flat_tags(client, name, current, records)
        made = [d for d in records if d.version == current and d.applied]
        previous = made[-1].previous_champion if made else client.get_model_version(name, current).tags.get(
            "previous_champion")  # a champion promoted before the history was kept
        if not previous:
            raise RegistryError(f"{name} champion v{current} has no previous champion recorded; promote a version "
                                "with `cass promote --force --reason ...` instead")
        # Where a later rollback of the restored version goes: what it had replaced when it was champion.
        before = [d for d in records if d.version == previous and d.applied]
        back_to = before[-1].previous_champion if before else client.get_model_version(name, previous).tags.get(
            "previous_champion")
        decision = Decision(max((d.seq for d in records), default=0) + 1, previous, "restored", _now(), _user(),
                            reason.strip(), current, back_to or None)
        write_record(client, name, previous, decision)
        client.set_registered_model_alias(name, CHAMPION, previous)
        set_tags(client, name, current, {"rolled_back_at": decision.at, "rollback_reason": reason.strip()})
        set_tags(client, name, previous, restore_tags(decision))
    log.info("%s: champion rolled back v%s -> v%s", name, current, previous)
    return PromotionResult(name, previous, True, previous, current, f"rollback: {decision.reason}")


def champions(cfg: MlflowConfig, networks: Sequence[str], client=None) -> dict[str, str | None]:
    """Each network's champion as ``<name> v<version>``; None where the model or its champion does not exist."""
    from mlflow.exceptions import MlflowException

    client = client or mlflow_client()
    found: dict[str, str | None] = {}
    for network in networks:
        name = model_name(cfg, network)
        try:
            version = current_champion(client, name)
        except (RegistryError, MlflowException):
            version = None
        found[network] = f"{name} v{version}" if version else None
    return found


def latest_version(name: str, client=None) -> str:
    from mlflow.exceptions import MlflowException

    client = client or mlflow_client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise RegistryError(f"cannot list versions of {name}: {exc.message}") from None
    if not versions:
        raise RegistryError(f"registered model '{name}' has no versions; run `cass demo` or `cass register` first")
    return str(max(int(v.version) for v in versions))


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


# --------------------------------------------------------------------------------------------------
# What the registry says: `cass registry`


def registered_models(client=None) -> list[str]:
    """The names of the registered models, without the promotion locks."""
    client = client or mlflow_client()
    names, token = [], None
    with registry_errors("the registry", "listing registered models"):
        while True:
            page = client.search_registered_models(max_results=500, page_token=token)
            names += [m.name for m in page if LOCK_SUFFIX not in m.name]
            token = page.token
            if not token:
                break
    return sorted(names)
