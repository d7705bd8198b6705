"""The model gate as registration and promotion apply it: one verdict per version, judged by recorded
thresholds, and the committed policy that promotion applies (:func:`default_gate` runs the model suite).

Any run can be given other gate thresholds (``--set quality.min_macro_f1=0.5``, ``dvc exp run -S ...``):
an experiment may register a model that only passes its own, lowered thresholds. What may reach
production is the project's decision, not the experiment's, so:

- registration is decided by the gate under the thresholds the run was given (as before), and the
  verdict is recorded once, with those thresholds and where they came from, as the version's
  ``model_gate_record`` tag (JSON); the ``model_gate`` tag, the model card and the log line are rendered
  from that record, so they cannot disagree;
- the *committed policy* is the ``quality:`` section of the settings file as committed in git at HEAD
  (``git show HEAD:params.yaml``), so a ``-S`` change in the workspace or a ``--set`` is not policy. Where
  the file is not in a git repository (or not committed) it is the file as it is on disk, without
  ``--set`` overrides; where no settings file is given (a library call) the run's settings are the policy;
- when the run's gate thresholds differ from the policy's, the gate is also run under the policy and its
  verdict is recorded beside the run's; a version that passed only under lowered thresholds is marked so
  (``model_gate``: ``passed only under lowered thresholds ...``) and promotion refuses it unless forced
  with a reason. Promotion applies the policy as committed when it runs, and also the thresholds it was
  given where those are stricter: a ``--set`` can tighten the gate for a promotion, never loosen it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cass.config import Params, QualityConfig, params_from_mapping
from cass.errors import ConfigError
from cass.logs import at_least_warning
from cass.names import QUALITY_CHECKS
from cass.outputs import EvaluateOutputs

GATE_SETTINGS = ("expected_metrics", "min_macro_f1", "min_balanced_accuracy", "max_ece", "max_subgroup_gap")
"""The ``quality:`` keys the model gate reads, beside the severities of its checks."""
MODEL_CHECKS = tuple(list(QUALITY_CHECKS)[list(QUALITY_CHECKS).index("metric_present"):])
"""The checks of the model suite (QUALITY_CHECKS lists the gates in order; the model gate's come last)."""


def gate_thresholds(quality: QualityConfig) -> dict[str, Any]:
    """What decides a model gate verdict besides the metrics: its thresholds and its checks' severities."""
    values = quality.model_dump(mode="json")
    out = {k: values[k] for k in GATE_SETTINGS}
    out["severity"] = {k: v for k, v in sorted(quality.severity.items()) if k in MODEL_CHECKS}
    return out


def threshold_changes(run: Mapping[str, Any], policy: Mapping[str, Any]) -> list[str]:
    """``quality.min_macro_f1 0.5 (policy 0.6)`` for each gate setting where the run differs from the policy."""
    return [f"quality.{k} {json.dumps(run.get(k))} (policy {json.dumps(policy.get(k))})"
            for k in sorted(set(run) | set(policy)) if run.get(k) != policy.get(k)]


def _lines(findings: tuple[str, ...]) -> list[str]:
    """The head line of each finding, short enough that a record fits an MLflow tag (8000 characters)."""
    return [f.splitlines()[0][:300] for f in findings[:12]]


@dataclass(frozen=True)
class GateVerdict:
    """The model gate's verdict on one version's test metrics.

    ``thresholds`` (:func:`gate_thresholds`) and ``source`` say what it was judged by; ``policy`` holds the
    committed policy's verdict where its thresholds differ from these (None: they are the same, or unknown).
    """

    passed: bool
    reasons: tuple[str, ...] = ()
    report: Path | None = None  # the gate's report folder (Data Docs and result.json), where it wrote one
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    checks: int = 0
    warnings: tuple[str, ...] = ()
    policy: GateVerdict | None = None

    @property
    def lowered(self) -> bool:
        """Passed under the run's thresholds, failed under the committed policy's."""
        return self.passed and self.policy is not None and not self.policy.passed

    @property
    def promotable(self) -> bool:
        return self.passed and not self.lowered

    def text(self) -> str:
        if not self.passed:
            return "failed: " + "; ".join(self.reasons)
        policy = self.policy
        if policy is None or policy.passed:
            return "passed"
        changes = ", ".join(threshold_changes(self.thresholds, policy.thresholds))
        return (f"passed only under lowered thresholds ({changes}); the committed policy ({policy.source}) fails "
                f"it: {'; '.join(r.splitlines()[0] for r in policy.reasons)}")

    def record(self) -> dict[str, Any]:
        """The JSON record of the version (``model_gate_record``); the tag, the card and the log render it."""
        out: dict[str, Any] = {"verdict": self.text(), "passed": self.passed, "promotable": self.promotable,
                               "thresholds": dict(self.thresholds), "source": self.source, "checks": self.checks,
                               "failures": _lines(self.reasons), "warnings": _lines(self.warnings)}
        if self.policy is not None:
            out["policy"] = {k: v for k, v in self.policy.record().items() if k != "policy"}
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> GateVerdict:
        policy = record.get("policy")
        return cls(bool(record.get("passed")), tuple(record.get("failures") or ()), None,
                   dict(record.get("thresholds") or {}), str(record.get("source") or ""),
                   int(record.get("checks") or 0), tuple(record.get("warnings") or ()),
                   cls.from_record(policy) if isinstance(policy, Mapping) else None)

    @classmethod
    def from_result(cls, result: Mapping[str, Any], quality: QualityConfig, source: str,
                    report: Path | None = None) -> GateVerdict:
        """The verdict of a model gate run (its ``result.json`` / ``GateResult.to_dict()``) under ``quality``."""

        def line(f: Mapping[str, Any]) -> str:
            return f"{str(f.get('severity', '')).upper()} {f.get('check')}: {f.get('catches')}"

        return cls(bool(result.get("success")), tuple(line(f) for f in result.get("failures") or ()), report,
                   gate_thresholds(quality), source, len(result.get("checks") or ()),
                   tuple(line(f) for f in result.get("warnings") or ()))


@dataclass(frozen=True)
class GatePolicy:
    """The committed gate settings and where they were read (``params.yaml at commit 1a2b3c4d5e6f``)."""

    quality: QualityConfig
    source: str


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _quality(raw: Any, where: str, run: Params) -> QualityConfig:
    """The ``quality:`` section of ``raw``, validated with the run's other settings (``auto`` metrics resolve
    for the run's data, as the run's own did)."""
    section = raw.get("quality", {}) if isinstance(raw, Mapping) else None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: no readable quality: section for the promotion policy; fix the file and commit it")
    try:
        return params_from_mapping({**run.model_dump(mode="json"), "quality": dict(section)}, where).quality
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n(the promotion policy's quality: section; fix it and commit it)") from None


def committed_policy(params_file: str | Path | None, run: Params) -> GatePolicy:
    """The promotion policy (module docstring): ``params_file`` at git HEAD, else on disk, else the run's."""
    if params_file is None:
        return GatePolicy(run.quality, "the run's settings (no settings file given)")
    path = Path(params_file).resolve()
    top = _git(["rev-parse", "--show-toplevel"], path.parent)
    if top is not None and path.is_relative_to(Path(top.strip()).resolve()):
        rel = path.relative_to(Path(top.strip()).resolve()).as_posix()
        text = _git(["show", f"HEAD:{rel}"], path.parent)
        commit = (_git(["rev-parse", "HEAD"], path.parent) or "").strip()
        if text is not None and commit:
            where = f"{rel} at commit {commit[:12]}"
            try:
                return GatePolicy(_quality(yaml.safe_load(text), where, run), where)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where}: not valid YAML ({exc}); fix it and commit it") from None
    if not path.is_file():
        raise ConfigError(f"{params_file}: settings file not found; the promotion policy is read from it")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_file}: not valid YAML ({exc})") from None
    where = f"{params_file} (not committed in git)"
    return GatePolicy(_quality(raw, where, run), where)


# --------------------------------------------------------------------------------------------------
# The gate


ModelGate = Callable[[Mapping[str, Any]], GateVerdict]
"""Takes a version's test metrics (the evaluate stage's metrics.json) and says whether it may serve."""

RUN_SETTINGS = "the run's settings"


def default_gate(params: Params, report_dir: Path | None = None, source: str = RUN_SETTINGS) -> ModelGate:
    """The model suite of :mod:`cass.quality` (floors and severities in the ``quality:`` section). With
    ``report_dir`` the gate's Data Docs and result.json stay there (a promotion attaches them to the version).
    The verdict records the thresholds it was judged by and ``source``, where they came from."""

    def gate(metrics: Mapping[str, Any]) -> GateVerdict:
        from cass.quality import validate_model

        with tempfile.TemporaryDirectory(prefix="cass-model-gate-") as tmp:
            path = EvaluateOutputs(Path(tmp)).metrics
            path.write_text(json.dumps(dict(metrics)))
            report = report_dir or Path(tmp) / "report"
            # The gate's log line names the local folder; the caller says where the report went.
            with at_least_warning("cass.quality.gate"):
                result = validate_model(params, path, report, raise_on_failure=False)
        return GateVerdict(result.success, tuple(f.describe() for f in result.failures), report_dir,
                           gate_thresholds(params.quality), source, len(result.checks),
                           tuple(w.describe() for w in result.warnings))

    return gate


def under_policy(params: Params, verdict: GateVerdict, metrics: Mapping[str, Any],
                 policy: GatePolicy | None) -> GateVerdict:
    """``verdict`` with the committed policy's verdict beside it where the policy's thresholds differ from the
    ones it was judged by (cass.quality.policy); unchanged without a policy or when they are the same."""
    if policy is None or verdict.policy is not None or not verdict.passed:
        return verdict
    if verdict.thresholds and dict(verdict.thresholds) == gate_thresholds(policy.quality):
        return replace(verdict, source=f"{verdict.source or RUN_SETTINGS}, as the committed policy ({policy.source})")
    ruled = default_gate(params.model_copy(update={"quality": policy.quality}), source=policy.source)(metrics)
    return replace(verdict, policy=ruled)

