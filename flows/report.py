"""What a retraining run tells its users: the Prefect artifacts' contents, as plain Markdown and tables.

Pure functions of run ids, metrics and decisions (no Prefect, no MLflow calls), so they are easy to read
and to test; :mod:`flows.retrain` publishes them with ``create_markdown_artifact`` / ``create_table_artifact``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cass.quality import GateResult
from cass.tracking import is_server, redact, ui_url, where_to_browse

METRICS = (("macro_f1", "macro F1"), ("balanced_accuracy", "balanced acc."), ("accuracy", "accuracy"),
           ("macro_auroc", "macro AUROC"))


@dataclass(frozen=True)
class MlflowLinks:
    """Where the runs are: a server gets clickable links, a local store the command that opens its UI."""

    tracking_uri: str
    experiment_id: str

    def run(self, run_id: str) -> str:
        if is_server(self.tracking_uri):
            return f"[{run_id}]({ui_url(self.tracking_uri, self.experiment_id, run_id)})"
        return f"`{run_id}`"

    def where(self) -> str:
        uri = redact(self.tracking_uri)
        browse = where_to_browse(self.tracking_uri, self.experiment_id)
        if is_server(self.tracking_uri):
            return f"MLflow at {uri}, experiment [{self.experiment_id}]({browse})"
        return f"local MLflow store `{uri}`, experiment {self.experiment_id} (browse: {browse})"


@dataclass(frozen=True)
class RunSummary:
    """Everything the summary artifact of a completed run shows."""

    dataset: str
    data_version: str  # DVC md5 of the dataset, or '' when untracked
    data_hash: str  # content hash of the prepared manifest
    test_set: str
    run_key: str
    label_fraction: float
    links: MlflowLinks
    pipeline_run_id: str
    pretraining: tuple[str, bool] | None  # (run id, reused)
    tuning: Mapping[str, str] = field(default_factory=dict)  # network -> best-parameters file, when tuned
    stage_runs: Mapping[str, str] = field(default_factory=dict)  # run name -> id
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # network -> test metrics
    promotions: Mapping[str, Any] = field(default_factory=dict)  # network -> cass.registry.PromotionResult
    gate_failures: Mapping[str, str] = field(default_factory=dict)  # network -> the model gate's failed checks
    recipe: Mapping[str, str] = field(default_factory=dict)  # the pretraining's recipe and why (pretraining_recipe)


def pretraining_recipe(pretrain_dir: Path | None) -> dict[str, str]:
    """The CASS recipe the pretraining in ``pretrain_dir`` ran, and why (its networks.json), or {}."""
    from cass.model_card import recipe_of
    from cass.outputs import PretrainOutputs

    return recipe_of(PretrainOutputs(Path(pretrain_dir)).networks) if pretrain_dir is not None else {}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _data_line(dataset: str, data_version: str, data_hash: str, test_set: str) -> str:
    version = f"DVC `{data_version}`" if data_version else "not versioned with DVC"
    return (f"Dataset **{dataset}**, data version {version}, manifest hash `{data_hash[:12]}`, "
            f"test split `{test_set[:12]}`.")


def summary_markdown(s: RunSummary) -> str:
    """The markdown summary of a completed retraining run."""
    title = ("# Retraining completed" if not s.gate_failures
             else f"# Retraining: model gate failed for {', '.join(s.gate_failures)}")
    lines = [title, "", _data_line(s.dataset, s.data_version, s.data_hash, s.test_set),
             f"Run key `{s.run_key[:12]}`.", ""]
    if s.pretraining is None:
        lines.append("Pretraining: none (`finetune.init` is not `cass`).")
    else:
        run_id, reused = s.pretraining
        how = f"reused (run {s.links.run(run_id)})" if reused else f"run {s.links.run(run_id)}"
        lines.append(f"Pretraining: {how}.")
        if s.recipe:
            lines.append(f"Pretraining recipe: {s.recipe['recipe']}"
                         + (f" ({s.recipe['recipe_reason']})." if s.recipe.get("recipe_reason") else "."))
    if s.tuning:
        lines.append("Tuning: best settings in " + ", ".join(f"`{path}`" for path in s.tuning.values()) + ".")
    else:
        lines.append("Tuning: skipped.")
    lines += ["", "## Test metrics", "", "| network | label fraction | " + " | ".join(n for _, n in METRICS)
              + " | test images |", "|---" * (len(METRICS) + 3) + "|"]
    for network, m in s.metrics.items():
        values = " | ".join(_fmt(m.get(k)) for k, _ in METRICS)
        lines.append(f"| {network} | {s.label_fraction:g} | {values} | {m.get('num_samples', 'n/a')} |")
    lines += ["", "## Promotion", "", "| network | version | decision | champion | reason |", "|---|---|---|---|---|"]
    for network, p in s.promotions.items():
        decision = "promoted" if p.promoted else "not promoted"
        champion = f"v{p.champion}" if p.champion else "none"
        lines.append(f"| {network} | {p.name} v{p.version} | {decision} | {champion} | {p.reason} |")
    for network, failure in s.gate_failures.items():
        reason = " ".join(failure.split())
        lines.append(f"| {network} | not registered | model gate failed | unchanged | {reason} |")
    lines += ["", "## MLflow runs", "", s.links.where() + ".", "", "| run | id |", "|---|---|",
              f"| pipeline (parent) | {s.links.run(s.pipeline_run_id)} |"]
    lines += [f"| {name} | {s.links.run(run_id)} |" for name, run_id in s.stage_runs.items()]
    return "\n".join(lines) + "\n"


def unchanged_markdown(
    *, dataset: str, data_version: str, data_hash: str, test_set: str, run_key: str, links: MlflowLinks,
    earlier_run_id: str, champions: Mapping[str, str | None],
) -> str:
    """The summary of a run that found nothing changed since a completed run, and trained nothing."""
    lines = [
        "# Nothing changed, nothing trained",
        "",
        _data_line(dataset, data_version, data_hash, test_set),
        "",
        f"The data and every setting that changes a result (run key `{run_key[:12]}`) are the same as in the "
        f"completed pipeline run {links.run(earlier_run_id)}, so this run trained nothing. Run with "
        "`force=True` to retrain anyway.",
        "",
        "| network | champion |",
        "|---|---|",
        *(f"| {network} | {version or 'none'} |" for network, version in champions.items()),
        "",
        links.where() + ".",
    ]
    return "\n".join(lines) + "\n"


def gate_table(results: Sequence[tuple[str, GateResult]]) -> list[dict[str, str]]:
    """One row per failed check of the gates: what failed, how badly, and a few offending rows."""
    rows = []
    for label, result in results:
        for finding in result.failures:
            count = f"{finding.unexpected} of {finding.rows}" if finding.unexpected is not None else "table"
            rows.append({
                "gate": label,
                "check": finding.check,
                "severity": finding.severity,
                "catches": finding.catches,
                "offending": count,
                "examples": "; ".join(finding.examples) or "-",
            })
    return rows
