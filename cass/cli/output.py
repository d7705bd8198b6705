"""Console output shared by several commands (the CLI is the one place that prints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cass.layout import Layout


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
