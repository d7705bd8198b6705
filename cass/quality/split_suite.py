"""The split gate, run before fine-tuning: leakage between splits, classes per split, label-fraction subsets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cass.config import Params
from cass.data.fingerprint import ensure_prepared
from cass.data.manifest import SPLITS, DatasetInfo, label_lists, read_manifest
from cass.data.splits import read_subset
from cass.quality.gate import GateResult, Table, check, run_gate

NOT_IN_MANIFEST = "(not in the manifest)"


def _spread(keys: Iterable[str], splits: list[str]) -> list[str | None]:
    """For each row, the splits its key (content hash, group) appears in, when there is more than one."""
    keys = list(keys)
    seen: dict[str, set[str]] = defaultdict(set)
    for k, s in zip(keys, splits, strict=True):
        if k:
            seen[k].add(s or "(none)")
    return [", ".join(sorted(seen[k])) if k and len(seen[k]) > 1 else None for k in keys]


def images_table(df: pd.DataFrame) -> Table:
    splits = df["split"].astype(str).tolist()
    frame = pd.DataFrame(
        {
            "path": df["path"].astype(str).to_numpy(),
            "split": [s or None for s in splits],
            "image_in_splits": _spread(df["sha256"].astype(str), splits),
            "group_in_splits": _spread(df["group"].astype(str), splits),
        }
    )
    checks = (
        # A row that no stage would use, or a split name a typo produced.
        check("split_known", f"a row without a split or with a split other than {list(SPLITS)}",
              "ExpectColumnValuesToBeInSet", column="split", value_set=list(SPLITS)),
        # The same image (by content) in train and test: test scores measure memory, not generalisation.
        check("hash_one_split", "the same image (same sha256) in more than one split",
              "ExpectColumnValuesToBeNull", column="image_in_splits"),
        # One patient's images in two splits: the model is tested on a patient it has seen.
        check("group_one_split", "one group/patient id in more than one split",
              "ExpectColumnValuesToBeNull", column="group_in_splits"),
    )
    return Table("images", frame, ("path",), checks)


def class_splits_table(df: pd.DataFrame, info: DatasetInfo) -> Table:
    present = set(df["split"]) | {"train", "test"}
    splits = [s for s in SPLITS if s in present]
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for ls, s in zip(label_lists(df), df["split"], strict=True):
        for c in ls:
            counts[(c, s)] += 1
    rows = [(c, s, counts[(c, s)]) for c in info.classes for s in splits]
    frame = pd.DataFrame(rows, columns=["class", "split", "images"])
    checks = (
        # A class absent from a split: never learned (train), never early-stopped on (val), or never scored (test).
        check("class_in_every_split", "a class with no image in one of the splits",
              "ExpectColumnValuesToBeBetween", column="images", min_value=1),
    )
    return Table("class_splits", frame, ("class", "split"), checks)


def subsets_table(params: Params, df: pd.DataFrame, data_dir: Path) -> Table:
    split_of = dict(zip(df["path"].astype(str), df["split"].astype(str), strict=True))
    rows = [
        (f, p, split_of.get(p, NOT_IN_MANIFEST) or "(none)")
        for f in params.split.label_fractions
        for p in read_subset(data_dir, f)
    ]
    frame = pd.DataFrame(rows, columns=["fraction", "path", "split"])
    checks = (
        # A labelled fine-tuning image taken from val/test (or from another dataset version): leakage.
        check("subset_in_train", "a label-fraction subset row that is not in the training split",
              "ExpectColumnValuesToBeInSet", column="split", value_set=["train"]),
    )
    return Table("subsets", frame, ("fraction", "path"), checks)


def validate_splits(params: Params, data_dir: Path, report_dir: Path, *, raise_on_failure: bool = True) -> GateResult:
    """Gate before fine-tuning: splits of the manifest in ``data_dir`` and its label-fraction subsets.

    Prepared data made from other settings or data than ``params`` is refused, not validated."""
    data_dir = Path(data_dir)
    ensure_prepared(params, data_dir)
    df, info = read_manifest(data_dir)
    tables = [images_table(df), class_splits_table(df, info), subsets_table(params, df, data_dir)]
    return run_gate("splits", tables, Path(report_dir), params.quality, raise_on_failure=raise_on_failure)
