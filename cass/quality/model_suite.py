"""The model gate, run before registration and promotion: the evaluation metrics of one network."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cass.config import Params
from cass.errors import DataError
from cass.names import FLOOR_METRICS
from cass.quality.gate import GateResult, Table, check, run_gate

FLOORED = FLOOR_METRICS


def _number(value: Any) -> float:
    """A metric as a float; NaN for null (how evaluate writes NaN), NaN itself, or anything not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: metrics file not found; run `cass evaluate` first") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rerun `cass evaluate`") from None
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: expected a JSON object of metrics; rerun `cass evaluate`")
    return metrics


def metrics_table(params: Params, metrics: dict[str, Any]) -> Table:
    q = params.quality
    names = list(dict.fromkeys((*FLOORED, *q.expected_metrics)))
    frame = pd.DataFrame(
        {
            "metric": names,
            "present": [n in metrics for n in names],
            "value": [_number(metrics.get(n)) for n in names],
        }
    )
    checks = (
        # An evaluation that crashed half-way or an old metrics format: nothing to compare a model on.
        check("metric_present", "an expected metric missing from metrics.json (quality.expected_metrics)",
              "ExpectColumnValuesToBeInSet", column="present", value_set=[True]),
        # NaN/null: a division by zero, a class without test images, or a diverged model.
        check("metric_not_nan", "a metric that is NaN or not a number", "ExpectColumnValuesToNotBeNull",
              column="value", row_condition="present==True", condition_parser="pandas"),
        # A value outside [0, 1]: a percentage where a fraction belongs, or a bug in the metric code.
        check("metric_in_range", "a metric outside [0, 1]", "ExpectColumnValuesToBeBetween",
              column="value", min_value=0.0, max_value=1.0),
        # A model no better than the floor must not reach the registry.
        check("macro_f1_floor", f"test macro F1 below quality.min_macro_f1 = {q.min_macro_f1:g}",
              "ExpectColumnValuesToBeBetween", column="value", min_value=q.min_macro_f1,
              row_condition='metric=="macro_f1"', condition_parser="pandas"),
        check("balanced_accuracy_floor",
              f"test balanced accuracy below quality.min_balanced_accuracy = {q.min_balanced_accuracy:g}",
              "ExpectColumnValuesToBeBetween", column="value", min_value=q.min_balanced_accuracy,
              row_condition='metric=="balanced_accuracy"', condition_parser="pandas"),
    )
    return Table("metrics", frame, ("metric",), checks)


def classes_table(metrics: dict[str, Any]) -> Table:
    per_class = metrics.get("per_class") or {}
    frame = pd.DataFrame(
        {
            "class": list(per_class),
            "recall": [_number(v.get("recall") if isinstance(v, dict) else None) for v in per_class.values()],
        }
    )
    checks = (
        # A class the model never predicts correctly: a good macro average can hide it.
        check("class_recall_nonzero", "a class with zero recall on the test split", "ExpectColumnValuesToBeBetween",
              column="recall", min_value=0.0, strict_min=True),
    )
    return Table("classes", frame, ("class",), checks)


CEILINGS = (("ece", "max_ece"), ("subgroup_gap", "max_subgroup_gap"))


def ceilings_table(params: Params, metrics: dict[str, Any]) -> Table:
    """One row per optional ceiling that is set (``quality.max_ece``, ``quality.max_subgroup_gap``)."""
    q = params.quality
    rows = [(name, _number(metrics.get(name)), getattr(q, key)) for name, key in CEILINGS
            if getattr(q, key) is not None]
    frame = pd.DataFrame(
        {
            "metric": [r[0] for r in rows],
            "value": [r[1] for r in rows],
            "limit": [r[2] for r in rows],
            # a missing or NaN value is not within the limit: nothing shows the model is calibrated / fair
            "within": [bool(r[1] <= r[2]) for r in rows],
        },
        columns=["metric", "value", "limit", "within"],
    )
    checks = (
        # Probabilities that say 0.9 where the model is right half the time mislead the reader of a report.
        check("ece_ceiling", f"test ECE after temperature scaling above quality.max_ece = {q.max_ece}",
              "ExpectColumnValuesToBeInSet", column="within", value_set=[True],
              row_condition='metric=="ece"', condition_parser="pandas"),
        # A model much worse for one site, scanner, sex or age band than on average must not serve them.
        check("subgroup_gap_ceiling",
              f"worst subgroup below the whole test split by more than quality.max_subgroup_gap = "
              f"{q.max_subgroup_gap}", "ExpectColumnValuesToBeInSet", column="within", value_set=[True],
              row_condition='metric=="subgroup_gap"', condition_parser="pandas"),
    )
    return Table("ceilings", frame, ("metric", "value", "limit"), checks)


def validate_model(
    params: Params, metrics_path: Path, report_dir: Path, *, raise_on_failure: bool = True
) -> GateResult:
    """Gate before registration and promotion: the ``metrics.json`` written by ``cass evaluate``."""
    metrics = read_metrics(Path(metrics_path))
    tables = [metrics_table(params, metrics), classes_table(metrics), ceilings_table(params, metrics)]
    return run_gate("model", tables, Path(report_dir), params.quality, raise_on_failure=raise_on_failure)
