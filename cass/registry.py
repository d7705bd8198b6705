"""The model registry: ``<prefix>-cnn`` and ``<prefix>-vit``, and promotion by moving the ``champion`` alias.

A version becomes champion only when the model quality gate passes and it beats the current champion
on the SAME test set (same test-split hash) by ``mlflow.promotion_margin`` in ``mlflow.promotion_metric``.
Every decision is written as tags on the version (``promoted_at``, ``previous_champion``,
``compared_metrics``, ``promotion_reason``, or ``promotion_refused_*``), since aliases keep no history.
``rollback`` moves the alias back to the version recorded as ``previous_champion``.

Two promotions of one model never interleave: each holds a lock while it reads the champion, decides
and moves the alias. The lock is a registered model named ``<name>.promotion-lock``, created and
deleted around the decision: creating a registered model is atomic in every MLflow backend (a unique
name in the database behind the server), so exactly one promoter holds it; the others wait and then
compare against the new champion. A lock left by a killed process is broken after
``mlflow.lock_stale_s``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cass import model_card
from cass.config import MlflowConfig, Params
from cass.errors import CassError, ConfigError, GateFailed
from cass.layout import METRICS_FILE, EvaluateOutputs

log = logging.getLogger(__name__)

CHAMPION = "champion"
LOCK_SUFFIX = ".promotion-lock"
SUMMARY_METRICS = ("macro_f1", "balanced_accuracy", "accuracy", "macro_auroc")

# Where a version's evaluation run keeps its test metrics: :mod:`cass.tracking` logs them there and the
# promotion reads them back, so both sides take the path from here.
EVALUATION_DIR = "evaluation"
METRICS_ARTIFACT = f"{EVALUATION_DIR}/{METRICS_FILE}"


class RegistryError(CassError):
    """A registry operation cannot be done (unknown model or version, no previous champion, ...)."""

    exit_code = 7


def model_name(cfg: MlflowConfig, network: str) -> str:
    return f"{cfg.model_prefix}-{network}"


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def finite(value: Any) -> bool:
    """A metric value MLflow can store and a promotion can compare: a finite number, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# The model quality gate


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: tuple[str, ...] = ()

    def text(self) -> str:
        return "passed" if self.passed else "failed: " + "; ".join(self.reasons)


ModelGate = Callable[[Mapping[str, Any]], GateVerdict]
"""Takes a version's test metrics (the evaluate stage's metrics.json) and says whether it may serve."""


def default_gate(params: Params) -> ModelGate:
    """The model suite of :mod:`cass.quality` (floors and severities in the ``quality:`` section)."""

    def gate(metrics: Mapping[str, Any]) -> GateVerdict:
        from cass.quality import validate_model

        with tempfile.TemporaryDirectory(prefix="cass-model-gate-") as tmp:
            path = EvaluateOutputs(Path(tmp)).metrics
            path.write_text(json.dumps(dict(metrics)))
            result = validate_model(params, path, Path(tmp) / "report", raise_on_failure=False)
        return GateVerdict(result.success, tuple(f.describe() for f in result.failures))

    return gate


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


def register(params: Params, candidate: Candidate, client=None, gate: ModelGate | None = None):
    """Register ``candidate`` as a new version of ``<prefix>-<network>``; returns the ModelVersion.

    Only a model that passes the model gate enters the registry: the verdict is the candidate's own (the
    pipeline's gate stage), else the gate runs here; a failed gate raises :class:`cass.errors.GateFailed`
    and registers nothing. The verdict is tagged ``model_gate`` on the version.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    verdict = gate_candidate(params, candidate, gate)
    if not verdict.passed:
        raise GateFailed(refusal(params, candidate.network, verdict))
    client = client or _client()
    name = model_name(params.mlflow, candidate.network)
    tags = {**candidate.tags, GATE_TAG: verdict.text()}
    tags.update({f"test_{k}": f"{candidate.metrics[k]:.6g}" for k in SUMMARY_METRICS
                 if finite(candidate.metrics.get(k))})
    try:
        mv = mlflow.register_model(candidate.model_uri, name, tags=tags)
        client.update_model_version(name, mv.version, description=describe_version(params, candidate))
        client.update_registered_model(name, description=describe_model(params, candidate.network))
        model_card.attach(params, candidate, name, mv.version, client, describe_version(params, candidate))
    except MlflowException as exc:
        raise RegistryError(f"registering {candidate.model_uri} as {name} failed: {exc.message}") from None
    log.info("registered %s version %s", name, mv.version)
    return mv


def register_once(params: Params, candidate: Candidate, client=None, gate: ModelGate | None = None):
    """:func:`register`, safe to retry: a version already registered from the same evaluation run (the
    answer lost on the way back) is found and completed, not registered twice. Returns the ModelVersion."""
    client = client or _client()
    name = model_name(params.mlflow, candidate.network)
    evaluation = candidate.tags.get("evaluation_run_id")
    done = [v for v in client.search_model_versions(f"name = '{name}'")
            if evaluation and v.tags.get("evaluation_run_id") == evaluation]
    if not done:
        return register(params, candidate, client, gate)
    mv = done[0]
    if not mv.description:
        client.update_model_version(name, mv.version, description=describe_version(params, candidate))
    if model_card.CARD_TAG not in mv.tags:  # the card failed after the version was created
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
    """Hold ``<name>.promotion-lock`` (an atomically created registered model) for the block."""
    from mlflow.exceptions import MlflowException

    lock, token = f"{name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline = time.monotonic() + cfg.lock_timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": token, "acquired_at": f"{time.time():.3f}",
                      "holder": f"{socket.gethostname()}:{os.getpid()}"},
                description=f"Held while a promotion of {name} decides; deleted afterwards.",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _break_if_stale(client, lock, cfg.lock_stale_s)
        if time.monotonic() > deadline:
            raise RegistryError(
                f"another promotion of {name} has held {lock} for over {cfg.lock_timeout_s:g} s; retry later, or "
                f"delete the registered model '{lock}' if no promotion is running"
            )
        time.sleep(0.1 + random.random() * 0.3)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("owner") == token:
                client.delete_registered_model(lock)


def _break_if_stale(client, lock: str, stale_s: float) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    acquired = float(held.tags.get("acquired_at", "0") or 0)
    if time.time() - acquired > stale_s:
        log.warning("breaking the stale promotion lock %s held by %s", lock, held.tags.get("holder", "?"))
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("owner") == held.tags.get("owner"):
                client.delete_registered_model(lock)


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

    def summary(self) -> str:
        if self.promoted:
            return f"{self.name} v{self.version}: promoted to champion ({self.reason})"
        kept = f"v{self.champion}" if self.champion else "none"
        return f"{self.name} v{self.version}: not promoted, champion stays {kept} ({self.reason})"


def _champion(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
        return None if version is None else str(version)
    except MlflowException as exc:
        raise RegistryError(f"registered model '{name}' not found ({exc.error_code}); run the pipeline first") from None


def _set_tags(client, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def promote(
    name: str,
    version: str,
    params: Params,
    *,
    force: bool = False,
    reason: str | None = None,
    gate: ModelGate | None = None,
    client=None,
) -> PromotionResult:
    """Move ``champion`` to ``version`` when the gate passes and it beats the champion by the margin.

    ``force`` (with a ``reason``) skips the gate and the comparison; both are still recorded.
    """
    from mlflow.exceptions import MlflowException

    if force and not (reason and reason.strip()):
        raise ConfigError("--force needs --reason TEXT: say why the gate or the comparison is overridden")
    cfg = params.mlflow
    client = client or _client()
    gate = gate or default_gate(params)
    version = str(version)
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}; `cass promote --help` shows how to pick one") from None
    candidate_metrics = version_metrics(client, name, version)
    verdict = gate(candidate_metrics)

    with promotion_lock(client, name, cfg):
        previous = _champion(client, name)
        if previous == version:
            return PromotionResult(name, version, False, previous, previous, "already the champion")
        metric = cfg.promotion_metric
        compared: dict[str, Any] = {"metric": metric, "margin": cfg.promotion_margin,
                                    "candidate": candidate_metrics.get(metric), "gate": verdict.text(),
                                    "model_card": candidate.tags.get(model_card.CARD_TAG, "")}
        refusal, why = None, "first champion"
        if previous is not None:
            champion = client.get_model_version(name, previous)
            compared["champion_version"] = previous
            same_test_set = candidate.tags.get("test_set") and candidate.tags.get("test_set") == champion.tags.get(
                "test_set"
            )
            if not same_test_set:
                refusal = (
                    f"not comparable: v{version} was tested on test set {candidate.tags.get('test_set', '?')[:12]}, "
                    f"champion v{previous} on {champion.tags.get('test_set', '?')[:12]}; evaluate both on one test "
                    "split, or use --force --reason"
                )
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
        if not verdict.passed:
            refusal = f"model gate {verdict.text()}"

        if refusal is not None and not force:
            _set_tags(client, name, version, {
                "promotion_refused_at": _now(),
                "promotion_refused_reason": refusal,
                "compared_metrics": json.dumps(compared),
            })
            log.info("%s v%s not promoted: %s", name, version, refusal)
            return PromotionResult(name, version, False, previous, previous, refusal, compared=compared)

        if force:
            final_reason = f"forced: {reason.strip()}" + (f" (would have been refused: {refusal})" if refusal else "")
        else:
            final_reason = f"{why}; model gate {verdict.text()}"
        client.set_registered_model_alias(name, CHAMPION, version)
        _set_tags(client, name, version, {
            "promoted_at": _now(),
            "previous_champion": previous or "",
            "compared_metrics": json.dumps(compared),
            "promotion_reason": final_reason,
            "promotion_forced": str(force).lower(),
            "promoted_by": _user(),
        })
        now = _champion(client, name)
        if now != version:  # the lock makes this impossible unless someone moved the alias by hand
            raise RegistryError(f"{name}: champion is v{now} right after moving it to v{version}; check who moved it")
    log.info("%s: champion v%s -> v%s (%s)", name, previous, version, final_reason)
    return PromotionResult(name, version, True, version, previous, final_reason, force, compared)


def rollback(name: str, params: Params, *, reason: str, client=None) -> PromotionResult:
    """Move ``champion`` back to the version recorded as the current champion's ``previous_champion``."""
    if not (reason and reason.strip()):
        raise ConfigError("rollback needs --reason TEXT (recorded on both versions)")
    client = client or _client()
    with promotion_lock(client, name, params.mlflow):
        current = _champion(client, name)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        previous = client.get_model_version(name, current).tags.get("previous_champion")
        if not previous:
            raise RegistryError(f"{name} champion v{current} has no previous champion recorded; promote a version "
                                "with `cass promote --force --reason ...` instead")
        client.set_registered_model_alias(name, CHAMPION, previous)
        now = _now()
        _set_tags(client, name, current, {"rolled_back_at": now, "rollback_reason": reason.strip()})
        _set_tags(client, name, previous, {"restored_at": now, "restored_from": current,
                                           "restore_reason": reason.strip(), "restored_by": _user()})
    log.info("%s: champion rolled back v%s -> v%s", name, current, previous)
    return PromotionResult(name, previous, True, previous, current, f"rollback: {reason.strip()}")


def champions(cfg: MlflowConfig, networks: Sequence[str], client=None) -> dict[str, str | None]:
    """Each network's champion as ``<name> v<version>``; None where the model or its champion does not exist."""
    client = client or _client()
    found: dict[str, str | None] = {}
    for network in networks:
        name = model_name(cfg, network)
        try:
            version = _champion(client, name)
        except RegistryError:
            version = None
        found[network] = f"{name} v{version}" if version else None
    return found


def latest_version(name: str, client=None) -> str:
    from mlflow.exceptions import MlflowException

    client = client or _client()
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
