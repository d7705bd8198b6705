"""One pretraining and one cell of a study, through the platform's stage functions.

Each writes its stage outputs under its own :class:`cass.outputs.Layout` root (:mod:`cass.study.plan`) and a
small JSON record last, which is what a rerun looks for: a finished pretraining or cell is never trained again,
and an interrupted pretraining or fine-tuning resumes from its checkpoint (the stages' own resume).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from cass.cass_pretraining import pretrain
from cass.evaluate import evaluate
from cass.finetune import finetune
from cass.io import atomic_write_text
from cass.study.plan import Cell, Pretraining, StudyPlan

log = logging.getLogger(__name__)

CellHook = Callable[[Cell, dict[str, Any]], None]


def run_pretraining(plan: StudyPlan, p: Pretraining) -> dict[str, Any]:
    """Pretrain ``p.method`` with seed ``p.seed`` once for all its cells; returns its cost record."""
    path = plan.pretraining_file(p)
    if path.is_file():
        return json.loads(path.read_text())
    params = plan.pretrain_params(p)
    started = time.perf_counter()
    out = pretrain(params, plan.data_dir, plan.pretrain_layout(p).pretrain, resume=True, progress=False)
    wall = time.perf_counter() - started
    history = pd.read_csv(out.history)
    metrics = json.loads(out.metrics.read_text())
    networks = json.loads(out.networks.read_text())
    epoch_seconds = float(history["epoch_seconds"].sum()) if "epoch_seconds" in history else wall
    record = {
        "method": p.method, "seed": p.seed,
        "seconds": epoch_seconds,  # the epochs' time, also when an earlier, interrupted run trained some of them
        "wall_seconds": wall,
        "images_per_second": float(history["images_per_second"].mean()) if "images_per_second" in history else None,
        "images": int(metrics.get("images", 0)),
        "epochs": len(history),
        "collapsed": bool(metrics.get("collapsed", False)),
        "device": str(metrics.get("device", "")),
        "variant": networks.get("variant", networks.get("method", "")),
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    log.info("study: pretrained %s in %.1f s (%.0f images/s)", p.name, record["seconds"],
             record["images_per_second"] or 0)
    return record


def run_cell(plan: StudyPlan, cell: Cell) -> dict[str, Any]:
    """Fine-tune and evaluate one cell (its pretraining must be done); returns and writes its result."""
    done = plan.done(cell)
    if done is not None:
        return done
    params = plan.cell_params(cell)
    layout = plan.cell_layout(cell)
    pre = plan.pretrain_layout(cell.pretraining).pretrain if cell.pretraining else None
    cost: dict[str, Any] = json.loads(plan.pretraining_file(cell.pretraining).read_text()) if cell.pretraining else {}
    started = time.perf_counter()
    tuned = finetune(params, plan.data_dir, cell.network, layout.finetune(cell.network), pre, progress=False)
    finetune_seconds = time.perf_counter() - started
    evaluated = evaluate(params, plan.data_dir, tuned.out_dir, layout.evaluate(cell.network))
    metrics = json.loads(evaluated.metrics.read_text())
    trained = json.loads(tuned.metrics.read_text())
    result = {
        "method": cell.method, "seed": cell.seed, "label_fraction": cell.fraction, "network": cell.network,
        "key": cell.key,
        **{k: metrics[k] for k in ("macro_f1", "balanced_accuracy", "accuracy", "exact_match", "macro_auroc")
           if isinstance(metrics.get(k), int | float)},
        "test_images": int(metrics.get("num_samples", 0)),
        "finetune_seconds": finetune_seconds,
        "epochs_run": trained.get("epochs_run"),
        "pretrain_seconds": cost.get("seconds", 0.0),
        "pretrain_images_per_second": cost.get("images_per_second"),
    }
    atomic_write_text(plan.result_file(cell), json.dumps(result, indent=2) + "\n")
    log.info("study: %s: test macro F1 %.3f", cell.name, result.get("macro_f1", float("nan")))
    return result
