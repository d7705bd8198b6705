"""The manifest: one table, one row per image, whatever layout the dataset came in.

Columns: ``path`` (relative to the data root, POSIX separators), ``labels`` (class names joined by
``|``; exactly one for single-label data), ``split`` (train/val/test, or empty before splitting),
``sha256``, ``width``, ``height``, ``mode`` and ``group`` (patient id, may be empty). A JSON file beside
it (:class:`DatasetInfo`) holds what applies to the whole dataset.

pandas and the image readers are imported by the functions that use them: ``cass data show``
(:func:`summarize`) reads the manifest without them, in a fraction of the time.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass.data.problems import Problems
from cass.errors import DataError
from cass.io import atomic_write_text
from cass.outputs import INFO_FILE, MANIFEST_FILE

if TYPE_CHECKING:
    import pandas as pd

    from cass.config import Params
    from cass.data.images import ImageInfo

COLUMNS = ("path", "labels", "split", "sha256", "width", "height", "mode", "group")
SPLITS = ("train", "val", "test")
LABEL_SEP = "|"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    root: str
    layout: str
    classes: tuple[str, ...]
    multilabel: bool
    num_images: int
    data_version: str = ""
    git_commit: str = ""
    split_counts: dict[str, int] = field(default_factory=dict)
    # What the outputs were made from (cass.data.fingerprint): the settings and data version, and their hash.
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    # How the splits compare with the data prepared before (cass.data.prepare.compare_with_previous).
    split_changes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetInfo:
        d = json.loads(text)
        d["classes"] = tuple(d["classes"])
        return cls(**d)


def label_lists(df: pd.DataFrame) -> list[list[str]]:
    return [str(v).split(LABEL_SEP) if isinstance(v, str) and v else [] for v in df["labels"]]


def join_labels(labels: Iterable[str]) -> str:
    return LABEL_SEP.join(labels)


def empty_manifest() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})


def write_manifest(df: pd.DataFrame, info: DatasetInfo, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = df.loc[:, list(COLUMNS)].sort_values("path", kind="stable").reset_index(drop=True)
    atomic_write_text(out_dir / MANIFEST_FILE, ordered.to_csv(index=False))
    atomic_write_text(out_dir / INFO_FILE, info.to_json() + "\n")
    return out_dir / MANIFEST_FILE


def read_manifest(data_dir: Path) -> tuple[pd.DataFrame, DatasetInfo]:
    """Read a prepared manifest and its dataset info from ``data_dir``."""
    import pandas as pd

    mpath, ipath = _prepared_files(data_dir)
    df = pd.read_csv(mpath, dtype={c: "string" for c in ("path", "labels", "split", "sha256", "mode", "group")})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{mpath}: missing columns {missing}; regenerate it with `cass data prepare`")
    df = df.astype(object).where(df.notna(), "")
    df["width"] = pd.to_numeric(df["width"]).astype(int)
    df["height"] = pd.to_numeric(df["height"]).astype(int)
    return df, DatasetInfo.from_json(ipath.read_text())


def _prepared_files(data_dir: Path) -> tuple[Path, Path]:
    """The manifest and the dataset info of ``data_dir``; a DataError saying what to run when one is missing."""
    mpath, ipath = Path(data_dir) / MANIFEST_FILE, Path(data_dir) / INFO_FILE
    for p in (mpath, ipath):
        if not p.is_file():
            raise DataError(f"{p}: not found; run `cass data prepare` first")
    return mpath, ipath


def summarize(data_dir: Path, params: Params | None = None) -> str:
    """Class counts per split, for ``cass data show`` and ``cass data prepare``; with ``params``, a warning
    when the prepared data was made from other settings (:func:`cass.data.fingerprint.ensure_prepared`).
    Read with the csv module: showing a dataset needs neither pandas nor the image readers."""
    from cass.data.fingerprint import ensure_prepared

    mpath, ipath = _prepared_files(data_dir)
    info = DatasetInfo.from_json(ipath.read_text())
    counts: Counter[tuple[str, str]] = Counter()
    with open(mpath, newline="") as fh:
        for row in csv.DictReader(fh):
            for label in filter(None, (row.get("labels") or "").split(LABEL_SEP)):
                counts[label, row.get("split") or ""] += 1
    splits = [s for s in SPLITS if any(split == s for _, split in counts)]
    header = ["class", *splits, "total"]
    rows = [[c, *(str(counts[c, s]) for s in splits), str(sum(counts[c, s] for s in splits))] for c in info.classes]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = [" ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                    strict=True)))
             for r in [header, *rows]]
    lines = [
        f"dataset {info.name}: {info.num_images} images, {len(info.classes)} classes, "
        f"{'multi-label' if info.multilabel else 'single-label'}, root {info.root}",
        f"data version {info.data_version or '(not tracked by DVC)'}; splits {info.split_counts}",
        *table,
    ]
    if params is not None:
        try:
            ensure_prepared(params, data_dir)
        except DataError as exc:
            lines.append(f"WARNING: {exc}")
    return "\n".join(lines)


def _inspect_one(args: tuple[str, str, int]) -> ImageInfo | tuple[str, str]:
    from cass.data.images import ImageError, inspect_image

    root, rel, max_pixels = args
    try:
        return inspect_image(Path(root) / rel, max_pixels, where=rel)
    except ImageError as exc:
        return exc.kind, str(exc)


def inspect_all(
    root: Path, rel_paths: Sequence[str], max_pixels: int, workers: int = 0
) -> list[ImageInfo | tuple[str, str]]:
    """Hash and decode every file, in parallel: its :class:`ImageInfo`, or (kind, message) when unusable."""
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or os.cpu_count() or 1
    jobs = [(str(root), rel, max_pixels) for rel in rel_paths]
    if workers == 1 or len(jobs) < 64:
        return [_inspect_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_inspect_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))


def inspect_files(root: Path, rel_paths: Sequence[str], max_pixels: int, workers: int = 0) -> list[ImageInfo]:
    """Hash and decode every file; report every bad file at once, grouped by kind, not only the first."""
    from cass.data.images import ImageInfo

    problems = Problems()
    results = inspect_all(root, rel_paths, max_pixels, workers)
    for r in results:
        if not isinstance(r, ImageInfo):
            problems.add(*r)
    problems.raise_if_any(f"unusable image files under {root}")
    return [r for r in results if isinstance(r, ImageInfo)]
