"""Why it retrained: what changed in the data since the champion's data version, in one self-contained page.

A run that trains on a new data version compares its prepared manifest with the one the champion was
trained on (:func:`cass.comparison.version_manifest`): images added, removed and relabelled per class and
split (matched by content, sha256), images that moved split, the class balance before and after, shifts in
simple image statistics (size from the manifests; grey-level histogram and mean colour from a seeded sample
of at most ``SAMPLE`` images per side, decoded at 64 px), and the champion's metrics on its own test split
beside its metrics on the new unseen images (decay). The page is markdown rendered to HTML with inline CSS
and the histogram embedded as a data URI (:func:`cass.model_card.to_html`): it renders with no network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cass.names import PROMOTION_METRICS
from cass.outputs import DATA_CHANGE_DIR, DATA_CHANGE_FIGURE, DATA_CHANGE_HTML, DATA_CHANGE_JSON, DATA_CHANGE_MD

if TYPE_CHECKING:
    import pandas as pd

REPORT_DIR, REPORT_MD, REPORT_HTML = DATA_CHANGE_DIR, DATA_CHANGE_MD, DATA_CHANGE_HTML
REPORT_JSON, HISTOGRAM_PNG = DATA_CHANGE_JSON, DATA_CHANGE_FIGURE
SAMPLE = 200
BINS = 16
SPLITS = ("train", "val", "test")


def _labels(value: str) -> list[str]:
    return [c for c in str(value).split("|") if c]


def _per_class_split(df: pd.DataFrame) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for labels, split in zip(df["labels"], df["split"], strict=True):
        for c in _labels(labels):
            out[c, split] = out.get((c, split), 0) + 1
    return out


def changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, Any]:
    """Added, removed, relabelled and moved images (matched by sha256) per class and split, and the class
    balance of both manifests. Added count by their new class and split, removed by their old ones,
    relabelled by their new split and old -> new labels."""
    old = before.drop_duplicates("sha256").set_index("sha256")
    new = after.drop_duplicates("sha256").set_index("sha256")
    added = new.loc[~new.index.isin(old.index)]
    removed = old.loc[~old.index.isin(new.index)]
    common = new.index[new.index.isin(old.index)]
    relabelled = [(s, old.at[s, "labels"], new.at[s, "labels"], new.at[s, "split"]) for s in common
                  if old.at[s, "labels"] != new.at[s, "labels"]]
    moved = [(s, old.at[s, "split"], new.at[s, "split"]) for s in common if old.at[s, "split"] != new.at[s, "split"]]
    classes = sorted({c for df in (before, after) for v in df["labels"] for c in _labels(v)})
    rows = []
    a, r = _per_class_split(added.reset_index()), _per_class_split(removed.reset_index())
    for c in classes:
        for split in SPLITS:
            n_rel = sum(1 for _, was, now, sp in relabelled if sp == split and (c in _labels(was) or c in _labels(now)))
            if a.get((c, split)) or r.get((c, split)) or n_rel:
                rows.append({"class": c, "split": split, "added": a.get((c, split), 0),
                             "removed": r.get((c, split), 0), "relabelled": n_rel})
    moves: dict[str, int] = {}
    for _, was, now in moved:
        moves[f"{was} -> {now}"] = moves.get(f"{was} -> {now}", 0) + 1

    def balance(df: pd.DataFrame) -> dict[str, int]:
        counts = dict.fromkeys(classes, 0)
        for v in df["labels"]:
            for c in _labels(v):
                counts[c] += 1
        return counts

    return {"images_before": len(before), "images_after": len(after), "added": len(added), "removed": len(removed),
            "relabelled": len(relabelled), "moved": len(moved), "moves": moves, "per_class_split": rows,
            "balance_before": balance(before), "balance_after": balance(after),
            "relabelled_examples": [{"sha256": s[:12], "from": w, "to": n, "split": sp}
                                    for s, w, n, sp in relabelled[:20]]}


def image_stats(root: Path, df: pd.DataFrame, seed: int) -> dict[str, Any]:
    """Size (all rows, from the manifest) and grey-level histogram and mean colour (a seeded sample of at most
    ``SAMPLE`` rows; an image of the champion's data that is no longer under ``root`` is left out)."""
    from PIL import Image

    out: dict[str, Any] = {"images": len(df)}
    if len(df) == 0:
        return out
    if {"width", "height"} <= set(df.columns):
        w, h = (np.asarray(df[c], dtype=float) for c in ("width", "height"))
        out.update(width_mean=float(w.mean()), height_mean=float(h.mean()), width_min=float(w.min()),
                   width_max=float(w.max()), height_min=float(h.min()), height_max=float(h.max()))
    rng = np.random.default_rng(seed)
    paths = list(df["path"])
    chosen = [paths[i] for i in sorted(rng.choice(len(paths), size=min(SAMPLE, len(paths)), replace=False))]
    hist, colour, read = np.zeros(BINS), np.zeros(3), 0
    for rel in chosen:
        try:
            with Image.open(Path(root) / rel) as im:
                im.draft("RGB", (64, 64))
                rgb = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float64) / 255.0
        except (OSError, ValueError):
            continue  # an image of the champion's data that is no longer on disk
        grey = rgb.mean(axis=2)
        hist += np.histogram(grey, bins=BINS, range=(0.0, 1.0))[0]
        colour += rgb.reshape(-1, 3).mean(axis=0)
        read += 1
    if read:
        out.update(sampled=read, histogram=(hist / hist.sum()).tolist(), mean_rgb=(colour / read).tolist(),
                   mean_intensity=float((colour / read).mean()))
    return out


def histogram_shift(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Total-variation distance between two grey-level histograms (0: identical, 1: disjoint)."""
    if "histogram" not in a or "histogram" not in b:
        return float("nan")
    return float(0.5 * np.abs(np.asarray(a["histogram"]) - np.asarray(b["histogram"])).sum())


@dataclass
class DataChangeReport:
    """What a run says about why it retrained, for one network against its champion."""

    name: str
    champion: str
    champion_manifest: str  # hashes of the two manifests
    new_manifest: str
    change: dict[str, Any]
    stats_before: dict[str, Any]
    stats_after: dict[str, Any]
    stats_added: dict[str, Any]
    champion_test: Mapping[str, Any]  # the champion's metrics on its own test split (registered)
    champion_unseen: Mapping[str, Any]  # ... on the new unseen images
    unseen_images: int
    unseen_hash: str
    note: str = ""  # why a part could not be computed
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, default=str, sort_keys=True)


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else "n/a"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(r: DataChangeReport, figure: bool = True) -> str:
    """The report as markdown (its own ``#`` title; the model card demotes the headings)."""
    c = r.change
    out = [f"# Data change since champion v{r.champion} of {r.name}", "",
           f"Champion's manifest `{r.champion_manifest[:12]}` -> this run's `{r.new_manifest[:12]}`: "
           f"{c['images_before']} -> {c['images_after']} images; **{c['added']} added, {c['removed']} removed, "
           f"{c['relabelled']} relabelled** (matched by content, sha256); {c['moved']} kept images changed split"
           + (f" ({', '.join(f'{k}: {v}' for k, v in c['moves'].items())})" if c["moves"] else "") + ".", ""]
    if r.note:
        out += [f"*{r.note}*", ""]
    out += ["## Added, removed and relabelled per class and split", ""]
    rows = [[x["class"], x["split"], x["added"], x["removed"], x["relabelled"]] for x in c["per_class_split"]]
    out += [_table(["class", "split", "added", "removed", "relabelled"], rows) if rows else "No image changed.", ""]
    if c["relabelled_examples"]:
        out += ["Relabelled (first 20): " + "; ".join(f"`{x['sha256']}` {x['from']} -> {x['to']} ({x['split']})"
                                                     for x in c["relabelled_examples"]), ""]
    before, after = c["balance_before"], c["balance_after"]
    nb, na = max(sum(before.values()), 1), max(sum(after.values()), 1)
    out += ["## Class balance", "", _table(["class", "champion's data", "share", "new data", "share"], [
        [k, before[k], f"{before[k] / nb:.1%}", after[k], f"{after[k] / na:.1%}"] for k in before]), ""]
    sb, sa, sn = r.stats_before, r.stats_after, r.stats_added
    out += ["## Image statistics", "", _table(["", "champion's data", "new data", "added images"], [
        ["images", sb.get("images", 0), sa.get("images", 0), sn.get("images", 0)],
        ["mean width x height (px)", *(f"{_fmt(s.get('width_mean'), 1)} x {_fmt(s.get('height_mean'), 1)}"
                                        for s in (sb, sa, sn))],
        ["sampled for intensity", *(s.get("sampled", 0) for s in (sb, sa, sn))],
        ["mean intensity (0-1)", *(_fmt(s.get("mean_intensity")) for s in (sb, sa, sn))],
        ["mean R, G, B", *(", ".join(_fmt(v) for v in s.get("mean_rgb", [])) or "n/a" for s in (sb, sa, sn))],
    ]), "", f"Grey-level histogram shift (total variation, {BINS} bins) from the champion's data to the new data: "
        f"**{_fmt(histogram_shift(sb, sa))}**; to the added images: **{_fmt(histogram_shift(sb, sn))}**.", ""]
    if figure:
        out += [f"![Grey-level histograms]({HISTOGRAM_PNG})", ""]
    metrics = PROMOTION_METRICS
    out += ["## Decay of the champion", "",
            f"Champion v{r.champion} on its own test split (as registered) and on the {r.unseen_images} images of the "
            f"new data that neither it nor this run trained or validated on (hash `{r.unseen_hash[:12]}`):", "",
            _table(["metric", "own test split", "new unseen images", "change"], [
                [m.replace("_", " "), _fmt(r.champion_test.get(m)), _fmt(r.champion_unseen.get(m)),
                 _fmt(r.champion_unseen.get(m, math.nan) - r.champion_test.get(m, math.nan)
                      if isinstance(r.champion_test.get(m), int | float) else math.nan)]
                for m in metrics]), ""]
    return "\n".join(out).rstrip() + "\n"


def plot_histograms(r: DataChangeReport, path: Path) -> Path | None:
    """The grey-level histograms of both versions' data and of the added images, in one small PNG."""
    if "histogram" not in r.stats_after:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    centres = (np.arange(BINS) + 0.5) / BINS
    for stats, label in ((r.stats_before, "champion's data"), (r.stats_after, "new data"),
                         (r.stats_added, "added images")):
        if "histogram" in stats:
            ax.plot(centres, stats["histogram"], marker="o", ms=3, label=label)
    ax.set_xlabel("grey level")
    ax.set_ylabel("share of pixels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(r: DataChangeReport, out_dir: Path) -> Path:
    """report.md, the self-contained report.html, report.json and the histogram in ``out_dir``."""
    from cass.model_card import to_html

    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plot_histograms(r, out_dir / HISTOGRAM_PNG)
    text = to_markdown(r, figure is not None)
    (out_dir / REPORT_MD).write_text(text)
    (out_dir / REPORT_JSON).write_text(r.to_json() + "\n")
    figures = {HISTOGRAM_PNG: figure} if figure else {}
    (out_dir / REPORT_HTML).write_text(to_html(text, figures, f"Data change: {r.name} since v{r.champion}"))
    return out_dir


def build(name: str, champion: str, before: pd.DataFrame, after: pd.DataFrame, root: Path, seed: int,
          champion_test: Mapping[str, Any], champion_unseen: Mapping[str, Any], unseen: pd.DataFrame,
          manifests: tuple[str, str], note: str = "") -> DataChangeReport:
    """The report from the two manifests (``before``: the champion's), the data under ``root`` and the
    champion's metrics."""
    from cass.comparison import images_hash

    added = after[~after["sha256"].isin(set(before["sha256"]))]
    return DataChangeReport(
        name=name, champion=champion, champion_manifest=manifests[0], new_manifest=manifests[1],
        change=changes(before, after), stats_before=image_stats(root, before, seed),
        stats_after=image_stats(root, after, seed), stats_added=image_stats(root, added, seed),
        champion_test=dict(champion_test), champion_unseen=dict(champion_unseen), unseen_images=len(unseen),
        unseen_hash=images_hash(unseen) if len(unseen) else "", note=note)
