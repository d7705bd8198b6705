"""Robustness to small batches: test macro F1 of CASS- and DINO-pretrained networks, pretrained at batch 8
and at batch 32, then fine-tuned at one label fraction (default 10 %).

Same stages and demo settings as label_efficiency.py; only ``pretrain.batch_size`` changes (DINO's learning
rate follows its linear scaling rule, 5e-4 x batch / 256, as in the official recipe). Prints one JSON line.

    python benchmarks/batch_robustness.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _common import apply_threads, emit, environment, prepare_demo, run_method, setup_logging, summarize
from label_efficiency import add_experiment_arguments, experiment_settings

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
    env = environment(resolve_device("auto"))
    started = time.perf_counter()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="cass-batch-") as tmp:
        work = args.work or Path(tmp)
        raw = experiment_settings(args, work / "demo", [args.fraction])
        data_dir = prepare_demo(raw, work)
        rows = []
        for seed in seeds:
            for method in args.methods.split(","):
                for batch in batches:
                    rows += run_method(
                        raw, data_dir, work / f"{method}-{batch}-{seed}", method, seed, [args.fraction], networks,
                        extra={"pretrain.batch_size": batch},
                    )
    for r in rows:
        r["pretrain_batch_size"] = r.pop("pretrain.batch_size")
    table = pd.DataFrame(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
    emit({
        "benchmark": "batch_robustness",
        "settings": {k: v for k, v in vars(args).items() if k not in {"work", "csv"}},
        "summary": summarize(rows, ["method", "network", "pretrain_batch_size"]),
        "total_seconds": time.perf_counter() - started,
        **env,
    })


if __name__ == "__main__":
    main()
