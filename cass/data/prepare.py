"""Stage ``prepare``: dataset -> manifest, splits and label-fraction subsets on disk."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd

from cass.config import Params
from cass.data import adapters
from cass.data.manifest import DatasetInfo, inspect_files, label_lists, read_manifest, write_manifest
from cass.data.splits import assign_splits, write_subsets
from cass.errors import DataError
from cass.lineage import data_version, git_commit

log = logging.getLogger(__name__)


def load_layout(params: Params, work_dir: Path) -> adapters.AdapterResult:
    cfg = params.data
    root = Path(cfg.root)
    if cfg.layout == "imagefolder":
        return adapters.imagefolder(root)
    if cfg.layout == "csv":
        assert cfg.csv is not None  # guaranteed by DataConfig validation
        return adapters.csv_onehot(root, cfg.csv, cfg.group_column)
    assert cfg.medmnist_file is not None
    return adapters.medmnist(root / cfg.medmnist_file, work_dir, cfg.classes)


def check_labels(rows: pd.DataFrame, found: tuple[str, ...], expected: tuple[str, ...] | None) -> tuple[str, ...]:
    """Every label must belong to the configured class set (when one is configured)."""
    if expected is None:
        return found
    unknown: dict[str, list[str]] = {}
    for path, labels in zip(rows["path"], label_lists(rows), strict=True):
        for c in labels:
            if c not in expected:
                unknown.setdefault(c, []).append(path)
    if unknown:
        lines = [f"label '{c}' ({len(p)} image(s), e.g. {p[:3]})" for c, p in sorted(unknown.items())]
        raise DataError(
            "labels outside data.classes " + str(list(expected)) + ":\n  - " + "\n  - ".join(lines)
            + "\nAdd them to data.classes or fix the data."
        )
    return tuple(expected)


def prepare_data(params: Params, out_dir: Path, project_dir: Path | None = None) -> Path:
    """Build the manifest, assign splits, write label-fraction subsets. Returns ``out_dir``.

    Everything is built in a staging folder and moved into place at the end, so a failure leaves the
    previous outputs untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # MedMNIST images are extracted once, next to the outputs, and reused.
        result = load_layout(params, out_dir.parent / f"{out_dir.name}-medmnist")
        classes = check_labels(result.rows, result.classes, params.data.classes)
        log.info("inspecting %d images under %s", len(result.rows), result.root)
        infos = inspect_files(
            result.root, result.rows["path"].tolist(), params.data.max_image_pixels, params.data.workers
        )
        df = result.rows.copy()
        df["sha256"] = [i.sha256 for i in infos]
        df["width"] = [i.width for i in infos]
        df["height"] = [i.height for i in infos]
        df["mode"] = [i.mode for i in infos]
        df = assign_splits(df, params.split.val, params.split.test, params.split.seed)
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
        )
        write_manifest(df, info, staging)
        write_subsets(df, params.split.label_fractions, params.split.seed, staging)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _swap_in(staging: Path, out_dir: Path) -> None:
    backup = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(backup)
    staging.rename(out_dir)
    shutil.rmtree(backup, ignore_errors=True)


def summarize(data_dir: Path) -> str:
    """Class counts per split, for ``cass data show``."""
    df, info = read_manifest(data_dir)
    rows = []
    for labels, split in zip(label_lists(df), df["split"], strict=True):
        rows.extend((c, split) for c in labels)
    table = pd.DataFrame(rows, columns=["class", "split"]).value_counts().unstack(fill_value=0)
    splits = [s for s in ("train", "val", "test") if s in table.columns]
    table = table.reindex(index=list(info.classes), columns=splits, fill_value=0)
    table["total"] = table.sum(axis=1)
    lines = [
        f"dataset {info.name}: {info.num_images} images, {len(info.classes)} classes, "
        f"{'multi-label' if info.multilabel else 'single-label'}, root {info.root}",
        f"data version {info.data_version or '(not tracked by DVC)'}; splits {info.split_counts}",
        table.to_string(),
    ]
    return "\n".join(lines)
