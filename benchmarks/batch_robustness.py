"""Robustness to small batches: test macro F1 of CASS- and DINO-pretrained networks, pretrained at batch 8
and at batch 32, then fine-tuned at one label fraction (default 10 %).

Same stages (through ``cass study``, one study per batch size), datasets (``--datasets``), methods (any of
label_efficiency.py's, e.g. ``CASS simsiam``) and settings as label_efficiency.py; only ``pretrain.batch_size``
changes (DINO's learning rate follows its
linear scaling rule, 5e-4 x batch / 256, as in the official recipe). Prints one JSON line, and the table of
mean ± sd on stderr.

    python benchmarks/batch_robustness.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _common import (
    apply_threads,
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
from label_efficiency import add_experiment_arguments, datasets, experiment_settings

from cass.training import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(ap)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--fraction", type=float, default=0.1, help="label fraction for fine-tuning")
    ap.add_argument("--methods", default="CASS,DINO")
    args = ap.parse_args()
    setup_logging()
    apply_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    networks = args.networks.split(",")
    methods = parse_methods(args.methods)
    extra = parse_sets(args.sets)
    datasets(args)  # fail on a bad name before any training
    env = environment(resolve_device("auto"))
    started = time.perf_counter()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="cass-batch-") as tmp:
        work = args.work or Path(tmp)
        rows = []
        for kind in datasets(args):
            raw = experiment_settings(args, work / kind / "images", [args.fraction], kind)
            for batch in batches:  # one study per batch size (its settings differ), on the same prepared data
                rows += run_study_rows(raw, work / kind, methods, seeds, [args.fraction], networks,
                                       extra={**extra, "pretrain.batch_size": batch})
    for r in rows:
        r["pretrain_batch_size"] = r.pop("pretrain.batch_size")
    table = pd.DataFrame(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
    summary = summarize(rows, ["dataset", "method", "network", "pretrain_batch_size"])
    log.info("test macro F1 at %g labels, mean ± sd over seeds:\n%s", args.fraction,
             markdown_table(summary, "pretrain_batch_size", ["dataset", "method", "network"]))
    emit({
        "benchmark": "batch_robustness",
        "settings": {k: v for k, v in vars(args).items() if k not in {"work", "csv"}},
        "summary": summary,
        "total_seconds": time.perf_counter() - started,
        **env,
    })


if __name__ == "__main__":
    main()
