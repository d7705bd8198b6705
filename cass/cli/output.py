"""Console output shared by several commands (the CLI is the one place that prints)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cass.outputs import Layout


def print_metrics(results: Mapping[str, Mapping[str, Any]]) -> None:
    """The test metrics of each network as one table (`cass evaluate`, `cass demo`)."""
    print(f"\n{'network':8} {'macro F1':>9} {'bal. acc':>9} {'AUROC':>7}  test images")
    for network, m in results.items():
        auroc = m.get("macro_auroc")
        print(
            f"{network:8} {m['macro_f1']:9.3f} {m['balanced_accuracy']:9.3f} "
            f"{auroc if auroc is None else f'{auroc:7.3f}':>7}  {m['num_samples']}"
        )


def print_where_outputs_are(layout: Layout) -> None:
    """After a whole pipeline: where the figures of the evaluation lie."""
    print(f"\noutputs under {layout.root}/: confusion matrices and ROC curves in {layout.root}/evaluate/<network>/")


def pretraining_lines(pretrain_dir: Path) -> list[str]:
    """What pretraining learned, for a newcomer: the kNN accuracy of each network's features on the
    validation split before and after pretraining (``pretrain.monitor_every``), and whether it collapsed."""
    import json

    from cass.outputs import PretrainOutputs

    path = PretrainOutputs(pretrain_dir).metrics
    if not path.is_file():
        return []
    m = json.loads(path.read_text())
    method = m.get("method", "cass").upper() + (f" ({m['variant']})" if m.get("variant") else "")
    collapsed = "collapsed" if m.get("collapsed") else "did not collapse"
    lines = [f"\npretraining {method}: {collapsed}; kNN accuracy of its features on the validation split, "
             "before -> after pretraining:"]
    for network, label in (("cnn", "CNN"), ("vit", "ViT")):
        start, end = m.get(f"{network}_knn_accuracy_start"), m.get(f"{network}_knn_accuracy")
        if start is None or end is None:
            return [*lines[:1], "  not measured (pretrain.monitor_every: 0)"]
        lines.append(f"  {label:3} {start:.3f} -> {end:.3f} ({end - start:+.3f})")
    return lines
