"""Running a gate: pandas tables and declared checks -> a Great Expectations validation -> :class:`GateResult`.

Each suite (manifest, splits, model) derives plain pandas tables, one row per thing checked (an image, a
class, a metric), and declares its checks as data: a :class:`Check` names a GX Core 1.x expectation, its
arguments and the failure it catches. This module builds the GX suites from them in an ephemeral context
whose Data Docs site lives in the gate's report folder (no global GX project, no analytics), runs them and
reads the results back into a :class:`GateResult` with a few offending rows per failed check.

Severity comes from ``quality.severity`` (defaults in :data:`cass.names.QUALITY_CHECKS`): a failed "fail"
check makes the gate fail, a failed "warn" check is reported only. GX records it as critical/warning too, so
the Data Docs show the same split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cass.config import QualityConfig
from cass.errors import GateFailed
from cass.io import atomic_write_text
from cass.names import Severity
from cass.outputs import DOCS_DIR, RESULT_FILE

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Check:
    """One expectation: ``expectation`` is a GX class name (``ExpectColumnValuesToBeNull``), ``kwargs`` its
    arguments; ``catches`` names the failure it catches (shown in the summary and as the Data Docs note)."""

    name: str
    catches: str
    expectation: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def check(name: str, catches: str, expectation: str, **kwargs: Any) -> Check:
    return Check(name, catches, expectation, kwargs)


@dataclass(frozen=True)
class Table:
    """A DataFrame and the checks run on it; ``key`` columns name an offending row in the summary."""

    name: str
    frame: pd.DataFrame
    key: tuple[str, ...]
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Finding:
    """A failed check."""

    check: str
    severity: Severity
    catches: str
    table: str
    expectation: str
    unexpected: int | None  # offending rows; None for table-level checks
    rows: int
    examples: tuple[str, ...]

    def describe(self) -> str:
        count = f" ({self.unexpected} of {self.rows} {self.table} rows)" if self.unexpected is not None else ""
        lines = [f"{self.severity.upper()} {self.check}{count}: {self.catches}"]
        lines += [f"    - {e}" for e in self.examples]
        if self.unexpected is not None and self.unexpected > len(self.examples) and self.examples:
            lines.append(f"    ... and {self.unexpected - len(self.examples)} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class GateResult:
    """What a gate found. ``success`` is False when a check of severity "fail" failed."""

    suite: str
    success: bool
    failures: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    checks: tuple[str, ...]  # names of the checks run
    rows: dict[str, int]
    report_dir: Path
    docs: Path | None

    @property
    def result_file(self) -> Path:
        return self.report_dir / RESULT_FILE

    def summary(self) -> str:
        status = "passed" if self.success else "FAILED"
        rows = ", ".join(f"{n} {t} rows" for t, n in self.rows.items())
        head = (
            f"{self.suite} gate {status}: {len(self.failures)} failed, {len(self.warnings)} warning(s) "
            f"in {len(self.checks)} checks on {rows}"
        )
        lines = [head, *(f.describe() for f in (*self.failures, *self.warnings))]
        lines.append(f"report: {self.docs or self.result_file}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "success": self.success,
            "checks": list(self.checks),
            "rows": self.rows,
            "failures": [asdict(f) for f in self.failures],
            "warnings": [asdict(f) for f in self.warnings],
            "docs": str(self.docs) if self.docs else None,
        }


def import_gx() -> Any:
    """Import Great Expectations with its usage analytics off (no network from a gate)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # GX logs its own internals at INFO; keep the gate's output readable
        gx_log.setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def _context(docs_dir: Path) -> Any:
    """An in-memory GX context whose only Data Docs site is ``docs_dir``, rendered to read offline."""
    gx = import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    from cass.quality.data_docs import site_config

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={"local_site": site_config(docs_dir)},
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _expectation(gx: Any, c: Check, severity: Severity) -> Any:
    cls = getattr(gx.expectations, c.expectation)
    return cls(
        **c.kwargs,
        severity="critical" if severity == "fail" else "warning",
        notes=c.catches,
        meta={"check": c.name, "severity": severity},
    )


def _fmt(value: Any) -> str:
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _examples(result: Mapping[str, Any], exception: Mapping[str, Any], key: tuple[str, ...], limit: int) -> list[str]:
    if exception.get("raised_exception"):
        return [f"the check could not run: {exception.get('exception_message')}"]
    rows = result.get("partial_unexpected_index_list")
    if rows:
        out = []
        for row in rows[:limit]:
            name = " / ".join(_fmt(row[k]) for k in key if k in row) or "?"
            values = ", ".join(f"{k} = {_fmt(v)}" for k, v in row.items() if k not in key)
            out.append(f"{name}: {values}" if values else name)
        return out
    if "partial_unexpected_list" in result:
        return [_fmt(v) for v in result["partial_unexpected_list"][:limit]]
    if "observed_value" in result:
        return [f"observed {_fmt(result['observed_value'])}"]
    return []


def _exception_info(res: Any) -> Mapping[str, Any]:
    info = res.exception_info or {}
    if "raised_exception" not in info:  # keyed by metric: take the first that raised
        info = next((v for v in info.values() if isinstance(v, Mapping) and v.get("raised_exception")), {})
    return info


def _validate_table(
    gx: Any, ctx: Any, source: Any, suite: str, table: Table, quality: QualityConfig
) -> Iterator[tuple[str, Finding | None]]:
    """Build (idempotently) and run the GX suite of one table; yield (check name, Finding or None if passed)."""
    declared = {c.name: c for c in table.checks}
    batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe(table.name)
    gx_suite = ctx.suites.add_or_update(
        gx.ExpectationSuite(
            name=f"{suite}.{table.name}",
            expectations=[_expectation(gx, c, quality.severity_of(c.name)) for c in table.checks],
        )
    )
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{suite}.{table.name}", data=batch, suite=gx_suite)
    )
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{suite}.{table.name}",
            validation_definitions=[definition],
            actions=[],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": list(table.key),
                "partial_unexpected_count": quality.max_examples,
            },
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": table.frame})
    for validation in outcome.run_results.values():
        for res in validation.results:
            name = res.expectation_config.meta["check"]
            if res.success:
                yield name, None
                continue
            details = res.result or {}
            yield name, Finding(
                check=name,
                severity=quality.severity_of(name),
                catches=declared[name].catches,
                table=table.name,
                expectation=res.expectation_config.type,
                unexpected=details.get("unexpected_count"),
                rows=details.get("element_count", len(table.frame)),
                examples=tuple(_examples(details, _exception_info(res), table.key, quality.max_examples)),
            )


def run_gate(
    suite: str,
    tables: Sequence[Table],
    report_dir: Path,
    quality: QualityConfig,
    *,
    raise_on_failure: bool = True,
) -> GateResult:
    """Validate ``tables`` with GX, write Data Docs and ``result.json`` under ``report_dir``.

    Raises :class:`GateFailed` (after writing the report) when a "fail" check failed and ``raise_on_failure``.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = report_dir / DOCS_DIR
    shutil.rmtree(docs_dir, ignore_errors=True)  # Data Docs of this run only, no stale pages
    gx = import_gx()
    ctx = _context(docs_dir)
    source = ctx.data_sources.add_or_update_pandas(suite)
    names: list[str] = []
    findings: list[Finding] = []
    for table in tables:
        for name, finding in _validate_table(gx, ctx, source, suite, table, quality):
            names.append(name)
            if finding is not None:
                findings.append(finding)
    ctx.build_data_docs()
    docs = docs_dir / "index.html"
    failures = tuple(f for f in findings if f.severity == "fail")
    result = GateResult(
        suite=suite,
        success=not failures,
        failures=failures,
        warnings=tuple(f for f in findings if f.severity == "warn"),
        checks=tuple(names),
        rows={t.name: len(t.frame) for t in tables},
        report_dir=report_dir,
        docs=docs if docs.is_file() else None,
    )
    atomic_write_text(result.result_file, json.dumps(result.to_dict(), indent=2) + "\n")
    log.info(
        "%s gate %s (%d failed, %d warnings); Data Docs: %s",
        suite, "passed" if result.success else "FAILED", len(result.failures), len(result.warnings), result.docs,
    )
    if raise_on_failure and not result.success:
        raise GateFailed(result.summary(), result)
    return result
