"""Seeded, stratified train/val/test splits and nested label-fraction subsets.

Predefined splits are kept. When a group (patient) column is present, whole groups are assigned to a
split, so one patient never spans two. Label-fraction subsets are nested (the 1 % subset lies inside
the 10 % one) and hold at least one example of every class.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cass.data.manifest import label_lists
from cass.errors import DataError
from cass.io import atomic_write_text
from cass.layout import subset_file


def _stratum(labels: list[str], frequency: dict[str, int]) -> str:
    """Stratify multi-label rows by their rarest label (single-label rows: their label)."""
    return min(labels, key=lambda c: (frequency.get(c, 0), c)) if labels else ""


def _shares(n: int, val: float, test: float) -> tuple[int, int]:
    """How many of ``n`` items go to val and test; every split gets one where n allows."""
    n_test = round(n * test)
    n_val = round(n * val)
    if n >= 3:
        n_test = max(1, n_test)
        n_val = max(1, n_val) if val > 0 else 0
    elif n == 2:
        n_test, n_val = 1, 0
    else:
        n_test, n_val = 0, 0
    while n_test + n_val >= n and n > 1:
        if n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _split_units(units: pd.DataFrame, val: float, test: float, rng: np.random.Generator) -> dict[str, str]:
    """Assign each unit (image or group) to a split, stratified by the unit's stratum."""
    out: dict[str, str] = {}
    for _, block in units.groupby("stratum", sort=True):
        keys = sorted(block["key"])
        order = rng.permutation(len(keys))
        n_val, n_test = _shares(len(keys), val, test)
        for rank, i in enumerate(order):
            out[keys[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def assign_splits(rows: pd.DataFrame, val: float, test: float, seed: int) -> pd.DataFrame:
    """Fill the ``split`` column. Rows that already carry a split keep it; copies of one image stay together.

    If the data ships train and test but no val (Brain Tumor MRI), val is carved from train.
    """
    df = rows.copy()
    rng = np.random.default_rng(seed)
    labels = label_lists(df)
    frequency: dict[str, int] = {}
    for ls in labels:
        for c in ls:
            frequency[c] = frequency.get(c, 0) + 1
    df["_stratum"] = [_stratum(ls, frequency) for ls in labels]
    # A split unit is a group (patient) or an image; copies of one image (same sha256) form one unit, so a
    # duplicate never lands in two splits. (Unique images keep their path as key: their splits do not change.)
    first = df.groupby("sha256")["path"].transform("min") if "sha256" in df.columns else df["path"]
    df["_key"] = [g if g else f"path:{p}" for g, p in zip(df["group"], first, strict=True)]

    predefined = set(df["split"]) - {""}
    if predefined and (df["split"] == "").any():
        raise DataError("some images have a predefined split and others not; give every image a split or none")
    if predefined - {"train", "val", "test"}:
        raise DataError(f"unknown split names {sorted(predefined - {'train', 'val', 'test'})}")
    if predefined:
        if "train" not in predefined or "test" not in predefined:
            raise DataError(f"predefined splits {sorted(predefined)} lack train or test")
        if "val" not in predefined and val > 0:
            train = df[df["split"] == "train"]
            share = val / (1.0 - test)  # keep val at about `val` of the whole dataset
            units = train.groupby("_key", sort=True)["_stratum"].first().reset_index()
            units.columns = ["key", "stratum"]
            assigned = _split_units(units, 0.0, share, rng)
            carve = train["_key"].map(assigned) == "test"
            df.loc[carve[carve].index, "split"] = "val"
    else:
        units = df.groupby("_key", sort=True)["_stratum"].agg(lambda s: s.mode().iloc[0]).reset_index()
        units.columns = ["key", "stratum"]
        assigned = _split_units(units, val, test, rng)
        df["split"] = df["_key"].map(assigned)
    return df.drop(columns=["_stratum", "_key"])


def label_fraction_subset(train: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """A stratified, seeded subset of the training rows holding ``fraction`` of them.

    Per class, rows are drawn in one seeded order and the first ``ceil``-ish share is taken, so smaller
    fractions are subsets of larger ones. Every class keeps at least one example.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label fraction {fraction} is outside (0, 1]")
    train = train.sort_values("path", kind="stable").reset_index(drop=True)
    if fraction == 1.0:
        return train
    labels = label_lists(train)
    frequency: dict[str, int] = {}
    for ls in labels:
        for c in ls:
            frequency[c] = frequency.get(c, 0) + 1
    strata = pd.Series([_stratum(ls, frequency) for ls in labels])
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for _, idx in strata.groupby(strata, sort=True).groups.items():
        idx = np.asarray(sorted(idx))
        order = idx[rng.permutation(len(idx))]
        k = max(1, math.floor(len(idx) * fraction + 0.5))
        chosen.extend(order[:k].tolist())
    # Multi-label: make sure every label appears at least once.
    present = {c for i in chosen for c in labels[i]}
    for c in sorted(frequency):
        if c not in present:
            first = next(i for i, ls in enumerate(labels) if c in ls)
            chosen.append(first)
            present.update(labels[first])
    return train.iloc[sorted(set(chosen))].reset_index(drop=True)


def write_subsets(df: pd.DataFrame, fractions: tuple[float, ...], seed: int, data_dir: Path) -> list[Path]:
    train = df[df["split"] == "train"]
    written = []
    for f in fractions:
        subset = label_fraction_subset(train, f, seed)
        path = subset_file(data_dir, f)
        atomic_write_text(path, subset[["path", "labels"]].to_csv(index=False))
        written.append(path)
    return written


def read_subset(data_dir: Path, fraction: float) -> list[str]:
    path = subset_file(data_dir, fraction)
    if not path.is_file():
        raise DataError(
            f"{path}: no subset for label fraction {fraction:g}; add it to split.label_fractions and rerun "
            "`cass data prepare`"
        )
    return pd.read_csv(path, dtype=str)["path"].tolist()
