"""The study's answer as one self-contained HTML page (and its markdown, a CSV of every cell and the plot):
the recommendation and the rule, mean ± sd per method, network and label fraction, macro F1 against label
fraction with error bars, the paired per-seed differences, what the test split can resolve, and the cost.

The page is :func:`cass.model_card.to_html`'s: inline CSS, the plot embedded as a data URI, no script and no
external URL, so it reads offline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cass.io import atomic_write_text
from cass.study.stats import Cost, Decision, Paired, Summary

PLOT_FILE = "macro_f1.png"
HTML_FILE = "study.html"
MARKDOWN_FILE = "study.md"
RESULTS_FILE = "results.csv"
NETWORK_NAMES = {"cnn": "CNN", "vit": "ViT"}


@dataclass(frozen=True)
class StudyFindings:
    """Everything the report shows."""

    dataset: str
    data_hash: str
    key: str
    results: Sequence[Mapping[str, Any]]
    summary: Sequence[Summary]
    pairs: Sequence[Paired]
    costs: Sequence[Cost]
    decision: Decision
    settings: Mapping[str, Any]
    parent_run_id: str | None = None
    fragment: str = ""


def _ms(mean: float, sd: float, sign: str = "") -> str:
    return f"{mean:{sign}.3f} ± {sd:.3f}" if not math.isnan(sd) else f"{mean:{sign}.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot(summary: Sequence[Summary], path: Path, title: str) -> Path:
    """Test macro F1 against label fraction, one panel per network, mean ± sd error bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(s.network for s in summary))
    methods = list(dict.fromkeys(s.method for s in summary))
    fig, axes = plt.subplots(1, len(networks), figsize=(5.2 * len(networks), 4), sharey=True, squeeze=False)
    fractions = sorted({s.fraction for s in summary})
    for ax, network in zip(axes[0], networks, strict=True):
        for i, method in enumerate(methods):
            rows = sorted((s for s in summary if s.network == network and s.method == method), key=lambda s: s.fraction)
            ax.errorbar([s.fraction * 100 for s in rows], [s.mean for s in rows], yerr=[s.sd for s in rows],
                        marker="o", capsize=3, label=method, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xticks([f * 100 for f in fractions], [f"{f * 100:g} %" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.set_title(NETWORK_NAMES.get(network, network))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test macro F1 (mean ± sd over seeds)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_markdown(f: StudyFindings) -> str:
    d = f.decision
    seeds = sorted({int(r["seed"]) for r in f.results})
    fractions = sorted({s.fraction for s in f.summary})
    verdict = ("pretraining pays" if d.pretrains else "pretraining does not pay at this compute")
    out = [f"# Label-efficiency study of {f.dataset}", "",
           f"Data `{f.data_hash[:12]}`, study `{f.key}`, {len(f.results)} cells over seeds "
           f"{', '.join(map(str, seeds))}" + (f", MLflow parent run `{f.parent_run_id}`" if f.parent_run_id else "")
           + ".", "",
           "## The answer", "",
           f"**Recommended: {d.recommended}** ({verdict}). {d.reason[0].upper() + d.reason[1:]}.", "",
           f"The rule: at {d.fraction * 100:g} % labels, a method beats *{d.baseline}* for a network when the mean of "
           "its per-seed differences (same seed, so the same initialisation draw and batch order) is larger than their "
           "standard deviation, the seed-to-seed spread. It is recommended when it beats the baseline for every "
           "network; of several, the largest mean gain wins. Otherwise the baseline is recommended.", ""]
    if d.too_small:
        out += ["**The test split is too small to separate some methods:**", ""]
        out += [f"- {line}." for line in d.too_small]
        out += [""]
    if f.fragment:
        out += ["Settings fragment (`recommendation.yaml`; `pretrain.variant: auto` follows it for this data):", "",
                "```yaml", f.fragment.rstrip(), "```", ""]
    out += ["## Test macro F1", "", f"Mean ± sd over {len(seeds)} seed(s).", ""]
    rows = []
    for method in dict.fromkeys(s.method for s in f.summary):
        for network in dict.fromkeys(s.network for s in f.summary):
            cells = {s.fraction: s for s in f.summary if s.method == method and s.network == network}
            rows.append([method, NETWORK_NAMES.get(network, network),
                         *(_ms(cells[x].mean, cells[x].sd) if x in cells else "-" for x in fractions)])
    out += [_table(["method", "network", *(f"{x * 100:g} % labels" for x in fractions)], rows), "",
            f"![test macro F1 against label fraction]({PLOT_FILE})", ""]
    out += [f"## Paired differences against {d.baseline}", "",
            "Per seed: the method's test macro F1 minus the baseline's with the same seed.", ""]
    out += [_table(["method", "network", "labels", "per seed", "mean ± sd", "gain > spread", "test images"],
                   [[p.method, NETWORK_NAMES.get(p.network, p.network), f"{p.fraction * 100:g} %",
                     ", ".join(f"{s}: {v:+.3f}" for s, v in p.diffs.items()), _ms(p.mean, p.sd, "+"),
                     {True: "yes", False: "no", None: "n/a (one seed)"}[p.passes], p.test_images]
                    for p in f.pairs]), ""]
    out += ["## Cost", "",
            "Pretraining per run (mean over seeds), on the device it ran on; the hours scale the measured rate to "
            "100 epochs of this dataset (multiply by the ratio of your images and epochs).", ""]
    out += [_table(["method", "pretraining (s)", "images/s", "images x epochs", "device",
                    "hours for 100 epochs", "collapsed runs"],
                   [[c.method, f"{c.seconds:.1f}", f"{c.images_per_second:.0f}" if c.images_per_second else "n/a",
                     f"{c.images} x {c.epochs}", c.device or "?",
                     f"{c.hours():.2f}" if c.hours() is not None else "n/a", f"{c.collapsed} of {c.runs}"]
                    for c in f.costs] or [["(no method pretrains)", "", "", "", "", "", ""]]), ""]
    out += ["## Settings", "", _table(["setting", "value"], [[k, f"`{v}`"] for k, v in f.settings.items()]), ""]
    return "\n".join(out) + "\n"


def write(f: StudyFindings, out_dir: Path) -> Path:
    """study.md, study.html (self-contained), macro_f1.png and results.csv in ``out_dir``; returns the page."""
    from cass.model_card import to_html

    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plot(f.summary, out_dir / PLOT_FILE, f"{f.dataset} ({f.data_hash[:8]}), study {f.key}")
    pd.DataFrame(list(f.results)).to_csv(out_dir / RESULTS_FILE, index=False)
    text = to_markdown(f)
    atomic_write_text(out_dir / MARKDOWN_FILE, text)
    page = out_dir / HTML_FILE
    atomic_write_text(page, to_html(text, {PLOT_FILE: figure}, f"Label-efficiency study of {f.dataset}"))
    return page
