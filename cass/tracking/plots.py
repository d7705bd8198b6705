"""The curves of a training stage as one PNG, logged beside its history.csv."""

from __future__ import annotations

from pathlib import Path


def plot_history(history_csv: Path, out_png: Path, title: str) -> Path:
    """Loss curves (left) and the other per-epoch metrics (right) of one training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(history_csv)
    x = df["epoch"] if "epoch" in df else range(1, len(df) + 1)
    skip = {"epoch", "epoch_seconds", "images_per_second", "lr", "healthy_embedding_std"}
    losses = [c for c in df.columns if "loss" in c]
    others = [c for c in df.columns if c not in skip and c not in losses and pd.api.types.is_numeric_dtype(df[c])]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10 if others else 5, 4), squeeze=False)
    for c in losses:
        axes[0][0].plot(x, df[c], marker="o", label=c)
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_title(f"{title}: loss")
    axes[0][0].legend(fontsize=8)
    if others:
        for c in others:
            axes[0][1].plot(x, df[c], marker="o", label=c)
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_title(f"{title}: metrics")
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=100)
    plt.close(fig)
    return out_png
