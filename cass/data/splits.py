"""Train/val/test splits that stay put as the data grows, and nested label-fraction subsets.

The rule (``SPLIT_RULE``). A *split unit* is a group (patient, ``data.group_column``) or, for an image
without a group, its content: the sha256 of its bytes (the path only where no hash is known). Each unit's
key is hashed with ``split.seed`` into a number ``u`` in [0, 1), and ``u`` picks the split by fixed bands:
test for ``u < split.test``, val for ``u < split.test + split.val``, train above. A unit's split therefore
depends on its key and the split settings only, never on the other images:

- adding images never moves an existing one (nor a patient: a group keeps its key), and removing images
  never moves the others; only the new units are assigned, each by its own hash;
- byte-identical files share a key, so copies land in one split and a file renamed, moved to another
  class folder or relabelled keeps its split; an image whose bytes change is a new image to the rule;
- no previous manifest is read: a flow on a fresh worker gets the same splits as one that kept its outputs;
- changing ``split.seed``, ``split.val``, ``split.test`` or the group column is the one way to reshuffle
  (``cass data prepare`` says so and records it in ``dataset.json``).

Proportions follow the settings per class in expectation, not exactly: a class of ``n`` units gets a test
share of ``split.test`` +- ``sqrt(test * (1 - test) / n)`` (binomial), e.g. 0.20 +- 0.045 for 80 images.
A rule that rounded every class to its exact share would have to move earlier images when new ones
arrive; exactness is what this trades for stability.

Tiny strata. The split gate wants every class in every split, which hashing alone may miss for a class of a
few units (no test unit: probability ``(1 - test) ** n``, 11 % for 10 units at test 0.2). Within each
stratum (a class; for multi-label data the rarest label) of ``n`` units, train needs one unit, test one
when ``n >= 2`` and val one when ``n >= 3``; a split left empty takes the unit whose ``u`` lies nearest
its band, from a split that can spare one. That rescue is the only assignment that depends on other units:
when the stratum later grows (or shrinks) so that the rescue is no longer needed (or another is), the
rescued unit returns to its own band. It is logged, and happens in practice only for strata of fewer than
about 30 units.

Predefined splits are kept; where the data ships train and test but no val, val is carved from train by
the same hash (``u < split.val / (1 - split.test)``), with the same rescue.

Label-fraction subsets draw a second number ``w`` per image (content key, ``split.seed``): the subset of
fraction ``f`` is every training image with ``w < f``, plus, in each stratum and for each label, the image
with the smallest ``w`` (so every class is present). Smaller fractions are subsets of larger ones, and a
subset stays inside the next data version's subset as long as its images stay in train, except where the
smallest-``w`` image of a class is replaced by a new one with a smaller ``w``. Sizes are binomial around
``f`` times the class count, like the split shares.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass.data.manifest import label_lists
from cass.errors import DataError
from cass.io import atomic_write_text
from cass.outputs import subset_file

if TYPE_CHECKING:  # pandas is imported where it is called
    import pandas as pd

log = logging.getLogger(__name__)

SPLIT_SETTINGS = ("split.val", "split.test", "split.seed", "data.group_column", "split rule")
"""The settings whose change reshuffles the splits (the label fractions only change the subsets)."""

Band = tuple[str, float, float]


def unit_draw(key: str, seed: int, purpose: str = "split") -> float:
    """A number in [0, 1) fixed by the unit's key and the seed: the same on every machine, for every data version."""
    digest = hashlib.sha256(f"cass:{purpose}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _stratum(labels: list[str], frequency: dict[str, int]) -> str:
    """Stratify multi-label rows by their rarest label (single-label rows: their label)."""
    return min(labels, key=lambda c: (frequency.get(c, 0), c)) if labels else ""


def _frequency(labels: list[list[str]]) -> dict[str, int]:
    return dict(Counter(c for ls in labels for c in ls))


def _band_of(u: float, bands: Sequence[Band]) -> str:
    return next((name for name, lo, hi in bands if lo <= u < hi), bands[-1][0])


def _distance(u: float, band: Band) -> float:
    _, lo, hi = band
    return max(lo - u, u - hi, 0.0)


def _assign(units: pd.DataFrame, bands: Sequence[Band], needed: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Each unit's split by its band, then the tiny-strata rescue (module docstring); returns (splits, rescued keys).

    ``units`` has columns key, stratum, u; ``needed`` lists the splits a stratum of n units must fill, the
    first n of them, in priority order."""
    by_name = {b[0]: b for b in bands}
    out: dict[str, str] = {}
    rescued: list[str] = []
    for _, block in units.groupby("stratum", sort=True):
        draws = dict(zip(block["key"], block["u"], strict=True))
        split = {k: _band_of(u, bands) for k, u in draws.items()}
        must = [s for s in needed[: len(draws)] if by_name[s][2] > by_name[s][1]]
        for s in must:
            counts = Counter(split.values())
            if counts[s]:
                continue
            donors = [k for k, sp in split.items() if counts[sp] > (1 if sp in must else 0)]
            key = min(donors, key=lambda k: (_distance(draws[k], by_name[s]), k))
            split[key] = s
            rescued.append(key)
        out.update(split)
    return out, rescued


def unit_keys(df: pd.DataFrame) -> list[str]:
    """The split unit of each row: its group, else its content (sha256), else its path."""
    groups = df["group"] if "group" in df.columns else [""] * len(df)
    shas = df["sha256"] if "sha256" in df.columns else [""] * len(df)
    return [f"group:{g}" if g else f"sha256:{h}" if h else f"path:{p}"
            for g, h, p in zip(groups, shas, df["path"], strict=True)]


def _units(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """One row per split unit: its key, its stratum (the most common of its images') and its draw ``u``."""
    units = df.groupby("_key", sort=True)["_stratum"].agg(lambda s: s.mode().iloc[0]).reset_index()
    units.columns = ["key", "stratum"]
    units["u"] = [unit_draw(k, seed) for k in units["key"]]
    return units


def _log_rescued(rescued: list[str], units: pd.DataFrame, what: str) -> None:
    if not rescued:
        return
    strata = sorted(set(units.loc[units["key"].isin(rescued), "stratum"]))
    log.warning("%d unit(s) of the small class(es) %s placed by the tiny-class rule so that each %s has one; they "
                "may move when that class grows (cass.data.splits)", len(rescued), ", ".join(strata), what)


def assign_splits(rows: pd.DataFrame, val: float, test: float, seed: int) -> pd.DataFrame:
    """Fill the ``split`` column by the rule of the module docstring. Rows that already carry a split keep it.

    If the data ships train and test but no val (Brain Tumor MRI), val is carved from train.
    """
    df = rows.copy()
    labels = label_lists(df)
    frequency = _frequency(labels)
    df["_stratum"] = [_stratum(ls, frequency) for ls in labels]
    df["_key"] = unit_keys(df)

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
            units = _units(train, seed)
            assigned, rescued = _assign(units, [("val", 0.0, share), ("train", share, 1.0)], ("train", "val"))
            _log_rescued(rescued, units, "of train and the val carved from it")
            carve = train["_key"].map(assigned) == "val"
            df.loc[carve[carve].index, "split"] = "val"
    else:
        units = _units(df, seed)
        bands = [("test", 0.0, test), ("val", test, test + val), ("train", test + val, 1.0)]
        assigned, rescued = _assign(units, bands, ("train", "test", "val"))
        _log_rescued(rescued, units, "split")
        df["split"] = df["_key"].map(assigned)
    return df.drop(columns=["_stratum", "_key"])


def split_changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, int]:
    """How the images of an earlier manifest fared in a new one, matched by content (sha256): ``kept`` their
    split, ``moved`` to another, ``removed``; and ``added`` (new content)."""
    old = before.groupby("sha256")["split"].first().to_dict()
    new = after.groupby("sha256")["split"].first().to_dict()
    both = old.keys() & new.keys()
    moved = sum(old[h] != new[h] for h in both)
    return {"kept": len(both) - moved, "moved": moved, "added": len(new.keys() - old.keys()),
            "removed": len(old.keys() - new.keys())}


def changed_split_settings(before: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The split settings (``SPLIT_SETTINGS``) that differ between two recorded settings: {key: [before, now]}."""
    return {k: [before.get(k), now.get(k)] for k in SPLIT_SETTINGS if before.get(k) != now.get(k)}


def label_fraction_subset(train: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The training rows of the label-fraction subset ``fraction`` (module docstring): nested across fractions
    and, as far as the images stay in train, across data versions; every class (and label) present."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label fraction {fraction} is outside (0, 1]")
    train = train.sort_values("path", kind="stable").reset_index(drop=True)
    if fraction == 1.0:
        return train
    labels = label_lists(train)
    frequency = _frequency(labels)
    strata = [_stratum(ls, frequency) for ls in labels]
    keys = unit_keys(train.assign(group=""))  # per image (a subset is of images), by content
    w = [unit_draw(k, seed, "subset") for k in keys]
    chosen = {i for i, x in enumerate(w) if x < fraction}
    # The smallest-w row of each stratum and of each label is always in: every class present, at every fraction.
    lowest: dict[tuple[str, str], int] = {}
    for i, (s, ls) in enumerate(zip(strata, labels, strict=True)):
        for slot in [("stratum", s), *(("label", c) for c in ls)]:
            if slot not in lowest or (w[i], train.at[i, "path"]) < (w[lowest[slot]], train.at[lowest[slot], "path"]):
                lowest[slot] = i
    chosen |= set(lowest.values())
    return train.iloc[sorted(chosen)].reset_index(drop=True)


def write_subsets(df: pd.DataFrame, fractions: tuple[float, ...], seed: int, data_dir: Path) -> list[Path]:
    train = df[df["split"] == "train"]
    written = []
    for f in fractions:
        subset = label_fraction_subset(train, f, seed)
        path = subset_file(data_dir, f)
        atomic_write_text(path, subset[["path", "labels"]].to_csv(index=False))
        written.append(path)
        if f < 1.0:
            log.info("label fraction %g: %d of %d training images (%.1f %%)", f, len(subset), len(train),
                     100.0 * len(subset) / max(1, len(train)))
    return written


def read_subset(data_dir: Path, fraction: float) -> list[str]:
    path = subset_file(data_dir, fraction)
    if not path.is_file():
        raise DataError(
            f"{path}: no subset for label fraction {fraction:g}; add it to split.label_fractions and rerun "
            "`cass data prepare`"
        )
    import pandas as pd

    return pd.read_csv(path, dtype=str)["path"].tolist()
