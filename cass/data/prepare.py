"""Stage ``prepare``: dataset -> manifest, splits and label-fraction subsets on disk.

One pass reads the layout, checks the labels against ``data.classes``, hashes and decodes every image and
looks for the same image in two predefined splits; every problem met is reported at the end, grouped by
kind (:mod:`cass.data.problems`), and nothing is written unless there is none.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from cass.config import Params
from cass.config_tracking import metrics_fix
from cass.data import adapters
from cass.data.fingerprint import SPLIT_RULE, fingerprint, prepared_settings
from cass.data.images import ImageInfo
from cass.data.layouts import get_layout
from cass.data.manifest import DatasetInfo, inspect_all, label_lists, read_manifest, write_manifest
from cass.data.problems import Problems
from cass.data.splits import assign_splits, changed_split_settings, split_changes, write_subsets
from cass.errors import DataError
from cass.io import output_set
from cass.lineage import data_version, git_commit
from cass.names import unwritten_metrics

log = logging.getLogger(__name__)

UNKNOWN_LABEL = "label outside data.classes"
CROSS_SPLIT = "same image in two predefined splits"
TASK_SETTING = "setting the data contradicts"


def load_layout(params: Params, work_dir: Path, problems: Problems | None = None) -> adapters.AdapterResult:
    """The rows of the dataset, read by its registered layout (``data.layout``)."""
    own, problems = problems is None, problems if problems is not None else Problems()
    result = get_layout(params.data.layout).load(params.data, work_dir, problems)
    if own:
        problems.raise_if_any(f"{params.data.root}: the dataset cannot be read")
    return result


def check_labels(
    rows: pd.DataFrame, found: tuple[str, ...], expected: tuple[str, ...] | None, problems: Problems | None = None
) -> tuple[str, ...]:
    """Every label must belong to the configured class set (when one is configured)."""
    if expected is None:
        return found
    own, problems = problems is None, problems if problems is not None else Problems()
    unknown: dict[str, list[str]] = {}
    for path, labels in zip(rows["path"], label_lists(rows), strict=True):
        for c in labels:
            if c not in expected:
                unknown.setdefault(c, []).append(path)
    for c, paths in sorted(unknown.items()):
        problems.add(UNKNOWN_LABEL, f"label '{c}' ({len(paths)} image(s), e.g. {paths[:3]})",
                     f"add the labels to data.classes {list(expected)} or fix the data")
    if own:
        problems.raise_if_any(f"labels outside data.classes {list(expected)}")
    return tuple(expected)


def check_predefined_splits(df: pd.DataFrame, problems: Problems) -> None:
    """The same image (by content) in two predefined splits: its test score would measure memory."""
    splits: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, split, sha in zip(df["path"], df["split"], df["sha256"], strict=True):
        if split:
            splits[sha][split].append(path)
    for by_split in splits.values():
        if len(by_split) > 1:
            where = "; ".join(f"{s}: {', '.join(paths)}" for s, paths in sorted(by_split.items()))
            problems.add(CROSS_SPLIT, where, "keep each image in one split folder only (remove the other copies)")


def compare_with_previous(out_dir: Path, df: pd.DataFrame, settings: dict[str, Any]) -> dict[str, Any]:
    """How the splits compare with the prepared data already in ``out_dir`` (when there is one), logged and
    returned for ``dataset.json``. Only a report: the splits themselves never depend on earlier outputs
    (cass.data.splits), so a fresh worker without them assigns the same."""
    record: dict[str, Any] = {"rule": SPLIT_RULE}
    try:
        before, info = read_manifest(out_dir)
    except (DataError, OSError, ValueError, KeyError, TypeError):
        log.info("splits by rule %s; no earlier prepared data in %s to compare with", SPLIT_RULE, out_dir)
        return record
    changed = changed_split_settings(info.settings, settings)
    counts = split_changes(before, df)
    record.update(compared_with=info.fingerprint[:12], reshuffled=bool(changed), changed_settings=changed, **counts)
    existing = counts["kept"] + counts["moved"]
    if changed:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        log.warning("split settings changed since the last prepare (%s): splits drawn again, %d of the %d images "
                    "already there changed split (recorded in dataset.json)", what, counts["moved"], existing)
    elif counts["moved"]:
        log.warning("splits kept except %d of %d earlier images, moved by the tiny-class rule (cass.data.splits); "
                    "%d new images assigned, %d removed", counts["moved"], existing, counts["added"],
                    counts["removed"])
    else:
        log.info("splits kept: all %d earlier images kept their split; %d new images assigned, %d removed",
                 existing, counts["added"], counts["removed"])
    return record


def prepare_data(params: Params, out_dir: Path, project_dir: Path | None = None) -> Path:
    """Build the manifest, assign splits, write label-fraction subsets. Returns ``out_dir``.

    Everything is built in a staging folder and moved into place at the end, so a failure leaves the
    previous outputs untouched (later stages tell them apart by their fingerprint, cass.data.fingerprint).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    with output_set(out_dir) as staging:
        # MedMNIST arrays and DICOM files are extracted to images once, next to the outputs, and reused.
        result = load_layout(params, out_dir.parent / f"{out_dir.name}-{params.data.layout}", problems)
        classes = check_labels(result.rows, result.classes, params.data.classes, problems)
        if unwritten_metrics(params.quality.expected_metrics, result.multilabel):
            problems.add(TASK_SETTING, metrics_fix(params.quality.expected_metrics, result.multilabel))
        log.info("inspecting %d images under %s", len(result.rows), result.root)
        inspected = inspect_all(
            result.root, result.rows["path"].tolist(), params.data.max_image_pixels, params.data.workers
        )
        for r in inspected:
            if not isinstance(r, ImageInfo):
                problems.add(*r)
        good = [i for i, r in enumerate(inspected) if isinstance(r, ImageInfo)]
        infos = [r for r in inspected if isinstance(r, ImageInfo)]
        df = result.rows.iloc[good].copy()
        df["sha256"] = [i.sha256 for i in infos]
        df["width"] = [i.width for i in infos]
        df["height"] = [i.height for i in infos]
        df["mode"] = [i.mode for i in infos]
        check_predefined_splits(df, problems)
        problems.raise_if_any(f"{params.data.root}: not prepared, {out_dir} left as it was")
        df = assign_splits(df, params.split.val, params.split.test, params.split.seed)
        settings = prepared_settings(params, project_dir)
        changes = compare_with_previous(out_dir, df, settings)
        info = DatasetInfo(
            name=params.data.name,
            root=str(result.root),
            layout=params.data.layout,
            classes=classes,
            multilabel=result.multilabel,
            num_images=len(df),
            data_version=data_version(params.data.root, project_dir),
            git_commit=git_commit(project_dir),
            split_counts={k: int(v) for k, v in sorted(Counter(df["split"]).items())},
            settings=settings,
            fingerprint=fingerprint(settings),
            split_changes=changes,
        )
        write_manifest(df, info, staging)
        write_subsets(df, params.split.label_fractions, params.split.seed, staging)
    return out_dir


