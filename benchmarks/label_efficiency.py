"""Test macro F1 at 1 %, 10 % and 100 % labels: CASS (the paper's recipe and its variants) vs DINO vs no
pretraining, on one or more generated datasets.

On each dataset (``--datasets``: the demo tissue set and/or the grayscale shapes set, cass.data.shapes), over
several seeds (mean and sd), through ``cass study`` (cass.study: the same code path as on a user's dataset,
here untracked): the generated set is prepared once, then per method and seed ``pretrain`` (CASS with its
``pretrain.variant`` and ``pretrain.anti_collapse`` settings, DINO; none for the supervised-only baseline,
``finetune.init: random``), then per label fraction and network ``finetune`` and ``evaluate``. Methods are
named settings (cass.study.methods; ``--methods all`` lists every one); ``--set section.key=value`` changes the
base settings of every run (a method's own settings win; e.g. ``--set augment.recipe=strong``). The seed
changes initialisation, augmentation and batch order; the data split and the label-fraction subsets stay fixed
(``split.seed``). Writes a PNG plot of F1 against label fraction, a CSV of every run and a markdown table
of mean ± sd per dataset x method x network x label fraction (also on stderr); prints one JSON line. Each
dataset's study also leaves its HTML report under ``<work>/<dataset>/study/<key>/report/`` (``--work`` keeps
it, and a rerun with the same ``--work`` resumes with only the missing cells).

The defaults are sized for a 2-core CPU (timm's test networks, 32 px, short schedules). They show the
pipeline working side by side, not the paper's numbers: those need ImageNet-initialised ResNet-50 and
ViT-B/16 at 384 px, 100 pretraining epochs and the real datasets.

    python benchmarks/label_efficiency.py --plot docs/images/label_efficiency.png
    python benchmarks/label_efficiency.py --methods all --datasets tissue,shapes --image-size 64 \
        --table outputs/benchmarks/label_efficiency.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from _common import (
    DATASETS,
    DEFAULT_METHODS,
    METHODS,
    apply_threads,
    demo_mapping,
    emit,
    environment,
    log,
    markdown_table,
    parse_methods,
    parse_sets,
    run_study_rows,
    setup_logging,
    summarize,
)

from cass.training import resolve_device

COLORS = {"CASS": "tab:blue", "CASS + anti-collapse": "tab:cyan", "DINO": "tab:orange", "no pretraining": "tab:gray"}
SUMMARY_KEYS = ["dataset", "method", "network", "label_fraction"]
NETWORK_NAMES = {"cnn": "CNN", "vit": "ViT"}
SPARE_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "black", "gold",
                "lime", "navy", "teal")


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """The fixed colours of the original four methods, then a distinct colour for each other method."""
    spare = iter(c for c in SPARE_COLORS if c not in COLORS.values())
    return {m: COLORS[m] if m in COLORS else next(spare, "tab:gray") for m in methods}


def add_experiment_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seeds", default="1,2,3", help="training seeds (default: %(default)s)")
    ap.add_argument("--networks", default="cnn,vit")
    ap.add_argument("--cnn", default="test_resnet")
    ap.add_argument("--vit", default="test_vit")
    ap.add_argument("--image-size", type=int, default=32, help="64 gives the test ViT 16 patches instead of 4")
    ap.add_argument("--images-per-class", type=int, default=100, help="generated dataset size (4 classes)")
    ap.add_argument("--datasets", default="tissue", help=f"generated datasets, of {', '.join(DATASETS)}")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for every run, e.g. augment.recipe=strong (repeatable)")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-batch-size", type=int, default=32)
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--dino-local-crops", type=int, default=4, help="official: 8")
    ap.add_argument("--dino-out-dim", type=int, default=1024, help="official: 65536")
    ap.add_argument("--work", type=Path, help="folder for data and stage outputs (default: a temp dir)")
    ap.add_argument("--csv", type=Path, help="write every run's result here")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models on a shared CPU run fastest)"
    )


def experiment_settings(args: argparse.Namespace, root: Path, fractions: Sequence[float], kind: str = "tissue") -> dict:
    """The settings of the F1 benchmarks on generated dataset ``kind``, preparing the subsets of ``fractions``."""
    raw = demo_mapping(root, images_per_class=args.images_per_class, image_size=args.image_size, cnn=args.cnn,
                       vit=args.vit, kind=kind)
    raw["pretrain"].update(epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size,
                           dino={"local_crops": args.dino_local_crops, "out_dim": args.dino_out_dim})
    raw["split"]["label_fractions"] = list(fractions)
    # finetune.label_fraction must name a prepared subset; each run then sets its own fraction.
    raw["finetune"].update(epochs=args.finetune_epochs, label_fraction=fractions[0])
    return raw


def datasets(args: argparse.Namespace) -> list[str]:
    kinds = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in DATASETS]
    if unknown or not kinds:
        raise SystemExit(f"unknown dataset(s) {unknown or kinds}; known: {', '.join(DATASETS)}")
    return kinds


def plot(summary: pd.DataFrame, networks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(summary["dataset"]))
    colors = method_colors(list(dict.fromkeys(summary["method"])))
    fig, axes = plt.subplots(len(kinds), len(networks), figsize=(5.2 * len(networks), 4 * len(kinds)), sharey=True,
                             squeeze=False)
    for row, kind in zip(axes, kinds, strict=True):
        for ax, network in zip(row, networks, strict=True):
            shown = summary[(summary["network"] == network) & (summary["dataset"] == kind)]
            for method, rows in shown.groupby("method", sort=False):
                rows = rows.sort_values("label_fraction")
                ax.errorbar(rows["label_fraction"] * 100, rows["mean"], yerr=rows["sd"], marker="o", capsize=3,
                            label=method, color=colors[str(method)])
            ax.set_xscale("log")
            ticks = sorted(summary["label_fraction"].unique() * 100)
            ax.set_xticks(ticks, [f"{t:g} %" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("labelled training images")
            ax.set_title(f"{NETWORK_NAMES.get(network, network)} ({kind})")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("test macro F1 (mean ± sd over seeds)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(args: argparse.Namespace, seeds: int, env: dict, kinds: Sequence[str] | None = None) -> str:
    names = ", ".join(kinds) if kinds else args.datasets
    return (f"{names} ({4 * args.images_per_class} images, {args.image_size} px), {args.cnn} / {args.vit}, "
            f"{args.pretrain_epochs} pretraining epochs, {seeds} seeds; {env['device_name']}")


def report(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The summary (mean ± sd over seeds) as records; the markdown table on stderr and in ``--table``."""
    summary = summarize(rows, SUMMARY_KEYS)
    table = markdown_table(summary, "label_fraction", ["dataset", "method", "network"])
    log.info("test macro F1, mean ± sd over seeds:\n%s", table)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
    return summary


def decision(summary: Sequence[dict], fraction: float = 0.1, baseline: str = "no pretraining",
             rival: str = "DINO") -> dict[str, dict]:
    """The rule of docs/baselines.md for each CASS variant measured: at ``fraction`` labels, for both networks on
    every dataset, its mean beats ``baseline``'s by more than one sd (the larger of the two) and is at least
    ``rival``'s. Returns per method whether it passes and, per (dataset, network), the margins."""
    cell = {(r["dataset"], r["method"], r["network"]): r for r in summary if r["label_fraction"] == fraction}
    kinds = sorted({k[0] for k in cell})
    nets = sorted({k[2] for k in cell})
    out: dict[str, dict] = {}
    for method in sorted({k[1] for k in cell}):
        if not method.startswith("CASS"):
            continue
        checks = {}
        for kind in kinds:
            for net in nets:
                me, base, other = (cell.get((kind, m, net)) for m in (method, baseline, rival))
                if me is None or base is None or other is None:
                    checks[f"{kind}/{net}"] = None
                    continue
                margin = me["mean"] - base["mean"]
                checks[f"{kind}/{net}"] = {
                    "over_baseline": round(margin, 4), "sd": round(max(me["sd"], base["sd"]), 4),
                    "over_rival": round(me["mean"] - other["mean"], 4),
                    "passes": margin > max(me["sd"], base["sd"]) and me["mean"] >= other["mean"],
                }
        out[method] = {"passes": all(c is not None and c["passes"] for c in checks.values()), "checks": checks}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(ap)
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"default: %(default)s; all = every one of: {', '.join(METHODS)}")
    ap.add_argument("--plot", type=Path, default=Path("outputs/benchmarks/label_efficiency.png"))
    ap.add_argument("--table", type=Path, help="write the markdown table of mean ± sd here")
    ap.add_argument("--from-csv", type=Path, nargs="+",
                    help="only redraw the plot (and table) from CSVs written by --csv (e.g. one per dataset, run side "
                    "by side on two cores); the CSVs hold results only, so pass the run's settings (--image-size, "
                    "--images-per-class, --pretrain-epochs, --cnn, --vit) for the plot's title")
    args = ap.parse_args()
    setup_logging()
    apply_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    networks = args.networks.split(",")
    methods = parse_methods(args.methods)
    extra = parse_sets(args.sets)
    datasets(args)  # fail on a bad name before any training
    env = environment(resolve_device("auto"))
    if args.from_csv:
        rows = pd.concat([pd.read_csv(path) for path in args.from_csv]).to_dict("records")
        for r in rows:
            r.setdefault("dataset", "tissue")  # CSVs written before --datasets existed
        seeds = sorted({int(r["seed"]) for r in rows})
        kinds = list(dict.fromkeys(r["dataset"] for r in rows))
        summary_records = report(rows, args)
        plot(pd.DataFrame(summary_records), networks, args.plot, _title(args, len(seeds), env, kinds))
        emit({"benchmark": "label_efficiency", "from_csv": [str(path) for path in args.from_csv],
              "decision_rule": decision(summary_records)})
        return
    started = time.perf_counter()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="cass-labels-") as tmp:
        work = args.work or Path(tmp)
        rows = []
        for kind in datasets(args):
            raw = experiment_settings(args, work / kind / "images", fractions, kind)
            rows += run_study_rows(raw, work / kind, methods, seeds, fractions, networks, extra)
            if args.csv:  # every finished dataset kept, should a long benchmark be stopped
                args.csv.parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(args.csv, index=False)
    table = pd.DataFrame(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
    summary = pd.DataFrame(report(rows, args))
    plot(summary, networks, args.plot, _title(args, len(seeds), env))
    rule = decision(summary.to_dict("records"))
    log.info("decision rule at 10 %% labels (beats no pretraining by > 1 sd for both networks on every dataset, "
             "and >= DINO): %s", {m: r["passes"] for m, r in rule.items()})
    pretrain_seconds = table[table["pretrain_seconds"] > 0].groupby(["dataset", "method"])["pretrain_seconds"].mean()
    emit({
        "benchmark": "label_efficiency",
        "settings": {k: v for k, v in vars(args).items() if k not in {"work", "csv", "plot", "table"}},
        "summary": summary.to_dict("records"),
        "decision_rule": rule,
        "mean_pretrain_seconds": {f"{d} / {m}": v for (d, m), v in pretrain_seconds.items()},
        "plot": str(args.plot),
        "total_seconds": time.perf_counter() - started,
        **env,
    })


if __name__ == "__main__":
    main()
