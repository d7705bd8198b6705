"""Test macro F1 at 1 %, 10 % and 100 % labels: CASS vs DINO vs no pretraining vs CASS + anti-collapse.

On the demo dataset, over several seeds (mean and sd), through the library's stages: ``prepare_data``
once, then per seed and method ``pretrain`` (CASS, DINO, or CASS with ``pretrain.anti_collapse:
vicreg``; none for the supervised-only baseline, ``finetune.init: random``), then per label fraction and
network ``finetune`` and ``evaluate``. The seed changes initialisation, augmentation and batch order;
the data split and the label-fraction subsets stay fixed (``split.seed``). Writes a PNG plot of F1 against
label fraction and a CSV of every run; prints one JSON line.

The defaults are sized for a 2-core CPU (timm's test networks, 32 px, short schedules). They show the
pipeline working side by side, not the paper's numbers: those need ImageNet-initialised ResNet-50 and
ViT-B/16 at 384 px, 100 pretraining epochs and the real datasets.

    python benchmarks/label_efficiency.py --plot docs/images/label_efficiency.png
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
    METHODS,
    apply_threads,
    demo_mapping,
    emit,
    environment,
    prepare_demo,
    run_method,
    setup_logging,
    summarize,
)

from cass.training import resolve_device

COLORS = {"CASS": "tab:blue", "CASS + anti-collapse": "tab:cyan", "DINO": "tab:orange", "no pretraining": "tab:gray"}


def add_experiment_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seeds", default="1,2,3", help="training seeds (default: %(default)s)")
    ap.add_argument("--networks", default="cnn,vit")
    ap.add_argument("--cnn", default="test_resnet")
    ap.add_argument("--vit", default="test_vit")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images-per-class", type=int, default=100, help="demo dataset size (4 classes)")
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


def experiment_settings(args: argparse.Namespace, root: Path, fractions: Sequence[float]) -> dict:
    """The demo settings of the F1 benchmarks, preparing the label subsets of ``fractions``."""
    raw = demo_mapping(root, images_per_class=args.images_per_class, image_size=args.image_size, cnn=args.cnn,
                       vit=args.vit)
    raw["pretrain"].update(epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size,
                           dino={"local_crops": args.dino_local_crops, "out_dim": args.dino_out_dim})
    raw["split"]["label_fractions"] = list(fractions)
    # finetune.label_fraction must name a prepared subset; each run then sets its own fraction.
    raw["finetune"].update(epochs=args.finetune_epochs, label_fraction=fractions[0])
    return raw


def plot(summary: pd.DataFrame, networks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(networks), figsize=(5.2 * len(networks), 4), sharey=True, squeeze=False)
    for ax, network in zip(axes[0], networks, strict=True):
        for method, rows in summary[summary["network"] == network].groupby("method", sort=False):
            rows = rows.sort_values("label_fraction")
            ax.errorbar(rows["label_fraction"] * 100, rows["mean"], yerr=rows["sd"], marker="o", capsize=3,
                        label=method, color=COLORS.get(str(method)))
        ax.set_xscale("log")
        ticks = sorted(summary["label_fraction"].unique() * 100)
        ax.set_xticks(ticks, [f"{t:g} %" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.set_title({"cnn": "CNN", "vit": "ViT"}.get(network, network))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test macro F1 (mean ± sd over seeds)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(args: argparse.Namespace, seeds: int, env: dict) -> str:
    return (f"demo dataset ({4 * args.images_per_class} images, {args.image_size} px), {args.cnn} / {args.vit}, "
            f"{args.pretrain_epochs} pretraining epochs, {seeds} seeds; {env['device_name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(ap)
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--methods", default=",".join(METHODS), help="default: %(default)s")
    ap.add_argument("--plot", type=Path, default=Path("outputs/benchmarks/label_efficiency.png"))
    ap.add_argument("--from-csv", type=Path, help="only redraw the plot from a CSV written by --csv")
    args = ap.parse_args()
    setup_logging()
    apply_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    networks = args.networks.split(",")
    methods = args.methods.split(",")
    env = environment(resolve_device("auto"))
    if args.from_csv:
        rows = pd.read_csv(args.from_csv).to_dict("records")
        seeds = sorted({int(r["seed"]) for r in rows})
        plot(pd.DataFrame(summarize(rows, ["method", "network", "label_fraction"])), networks, args.plot,
             _title(args, len(seeds), env))
        return
    started = time.perf_counter()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="cass-labels-") as tmp:
        work = args.work or Path(tmp)
        raw = experiment_settings(args, work / "demo", fractions)
        data_dir = prepare_demo(raw, work)
        rows = []
        for seed in seeds:
            for method in methods:
                rows += run_method(raw, data_dir, work / f"{method}-{seed}".replace(" ", "_"), method, seed,
                                   fractions, networks)
    table = pd.DataFrame(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
    summary = pd.DataFrame(summarize(rows, ["method", "network", "label_fraction"]))
    plot(summary, networks, args.plot, _title(args, len(seeds), env))
    pretrain_seconds = table[table["pretrain_seconds"] > 0].groupby("method")["pretrain_seconds"].mean()
    emit({
        "benchmark": "label_efficiency",
        "settings": {k: v for k, v in vars(args).items() if k not in {"work", "csv", "plot"}},
        "summary": summary.to_dict("records"),
        "mean_pretrain_seconds": pretrain_seconds.to_dict(),
        "plot": str(args.plot),
        "total_seconds": time.perf_counter() - started,
        **env,
    })


if __name__ == "__main__":
    main()
