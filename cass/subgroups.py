"""Subgroup metrics: does the model serve every site, scanner, sex or age band as well as the whole test split?

The group of each image comes from a table beside the data (``data.groups_file``, by default the csv
layout's own CSV) with one column per grouping (``data.group_columns``) and a key column naming the image
(its manifest path, or its file name without extension as in ISIC's metadata CSV). Each subgroup gets the
macro F1 and the balanced accuracy of its test images, computed as scikit-learn does on that subset
(macro F1 over the classes present in its labels or predictions; balanced accuracy over the classes present
in its labels). The **worst-group gap** is the largest shortfall of a subgroup below the whole test split, in
either metric, among subgroups with at least ``evaluate.min_subgroup_size`` test images (smaller ones are
listed but too noisy to judge on); ``quality.max_subgroup_gap`` can gate it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from cass.config import Params
from cass.data.adapters import read_csv_file
from cass.errors import DataError
from cass.metrics import multi_label_metrics
from cass.names import FLOOR_METRICS

ALL = "(all)"
MISSING = "(missing)"


def groups_source(params: Params, image_root: Path | None = None) -> tuple[Path, str]:
    """The groups file and its key column, with the defaults of the settings applied. DICOM data's groups are
    attributes of its headers, in the table preparation wrote beside the images (``image_root``, info.root)."""
    cfg = params.data
    if cfg.layout == "dicom" and not cfg.groups_file:
        from cass.data.dicom_folder import DICOM_TABLE

        return Path(image_root or ".") / DICOM_TABLE, "path"
    if cfg.groups_file:
        return Path(cfg.root) / cfg.groups_file, cfg.groups_key or "path"
    if cfg.csv is None:  # DataConfig validation requires groups_file outside the csv layout
        raise DataError("data.group_columns needs data.groups_file")
    return Path(cfg.root) / cfg.csv.file, cfg.groups_key or cfg.csv.image_column


def read_groups(params: Params, paths: Sequence[str], image_root: Path | None = None) -> pd.DataFrame:
    """The ``data.group_columns`` of each manifest path (rows in the order of ``paths``; unknown -> "(missing)")."""
    columns = list(params.data.group_columns)
    file, key = groups_source(params, image_root)
    table = read_csv_file(file, "data.groups_file", "groups file")
    missing = [c for c in [key, *columns] if c not in table.columns]
    if missing:
        raise DataError(f"{file}: no column(s) {missing} (data.groups_key / data.group_columns); columns are "
                        f"{list(table.columns)}")
    keys = table[key].str.strip()
    repeated = keys[keys.duplicated()].unique().tolist()
    if repeated:
        raise DataError(f"{file}: key column '{key}' repeats {repeated[:5]}; each image needs one row")
    rows = {k: i for i, k in enumerate(keys)}
    found = [rows.get(p, rows.get(PurePosixPath(p).stem)) for p in paths]
    if paths and all(i is None for i in found):
        raise DataError(
            f"{file}: no value of column '{key}' matches a test image (e.g. {paths[0]!r} or its name without "
            f"extension {PurePosixPath(paths[0]).stem!r}); set data.groups_key to the column naming the images"
        )
    out = {}
    for c in columns:
        values = table[c].str.strip()
        out[c] = [(values.iloc[i] or MISSING) if i is not None else MISSING for i in found]
    return pd.DataFrame(out, index=range(len(paths)))


def _single_label_scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    present = np.union1d(y, pred)
    f1s = []
    for c in present:
        tp = float(((y == c) & (pred == c)).sum())
        denominator = float((y == c).sum() + (pred == c).sum())
        f1s.append(2 * tp / denominator if denominator else 0.0)
    recalls = [float(((y == c) & (pred == c)).sum() / (y == c).sum()) for c in np.unique(y)]
    return float(np.mean(f1s)), float(np.mean(recalls))


def scores(
    y: np.ndarray, probs: np.ndarray, multilabel: bool, thresholds: float | Sequence[float]
) -> tuple[float, float]:
    """(macro F1, balanced accuracy) of one set of images."""
    if multilabel:
        names = [str(i) for i in range(probs.shape[1])]
        m = multi_label_metrics(y, probs, names, thresholds)
        return m["macro_f1"], m["balanced_accuracy"]
    return _single_label_scores(np.asarray(y).astype(int), np.asarray(probs).argmax(axis=1))


def subgroup_table(
    y: np.ndarray, probs: np.ndarray, groups: pd.DataFrame, multilabel: bool, thresholds: float | Sequence[float],
    min_size: int,
) -> pd.DataFrame:
    """One row for the whole split, then one per (group column, value): images, macro F1, balanced accuracy."""
    f1, bacc = scores(y, probs, multilabel, thresholds)
    rows = [{"column": ALL, "group": ALL, "images": len(y), "macro_f1": f1, "balanced_accuracy": bacc,
             "counted": False}]
    for column in groups.columns:
        values = groups[column].to_numpy()
        for value in sorted(set(values)):
            inside = values == value
            f1, bacc = scores(y[inside], probs[inside], multilabel, thresholds)
            rows.append({"column": column, "group": value, "images": int(inside.sum()), "macro_f1": f1,
                         "balanced_accuracy": bacc, "counted": bool(inside.sum() >= min_size and value != MISSING)})
    return pd.DataFrame(rows)


def worst_group_gap(table: pd.DataFrame) -> dict[str, float]:
    """The largest shortfall below the whole split among counted subgroups (NaN when none is counted)."""
    overall = table[table["column"] == ALL].iloc[0]
    counted = table[table["counted"]]
    out: dict[str, float] = {}
    for metric in FLOOR_METRICS:
        out[f"subgroup_gap_{metric}"] = (
            max(0.0, float(overall[metric] - counted[metric].min())) if len(counted) else math.nan
        )
    gaps = [out[f"subgroup_gap_{metric}"] for metric in FLOOR_METRICS]
    out["subgroup_gap"] = math.nan if any(math.isnan(g) for g in gaps) else max(gaps)
    out["subgroups_counted"] = float(len(counted))
    return out


def worst_group(table: pd.DataFrame) -> Mapping[str, object] | None:
    """The counted subgroup with the lowest balanced accuracy (for summaries), or None."""
    counted = table[table["counted"]]
    if counted.empty:
        return None
    return counted.sort_values(["balanced_accuracy", "macro_f1"]).iloc[0].to_dict()
