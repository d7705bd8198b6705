"""Stage ``evaluate``: test-split metrics, confusion matrix and ROC curves of one fine-tuned network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cass.config import Params
from cass.data.dataset import ImageDataset, encode_targets, make_loader
from cass.data.manifest import label_lists, read_manifest
from cass.data.transforms import eval_transform
from cass.errors import DataError
from cass.finetune import load_classifier, predict_probs
from cass.io import atomic_path, atomic_write_text
from cass.layout import EvaluateOutputs
from cass.lineage import git_commit
from cass.metrics import classification_metrics, roc_curve
from cass.training import resolve_device, resolve_num_workers


def evaluate(params: Params, data_dir: Path, model_dir: Path, out_dir: Path) -> EvaluateOutputs:
    """Score the fine-tuned model in ``model_dir`` on the test split."""
    out = EvaluateOutputs(Path(out_dir))
    df, info = read_manifest(Path(data_dir))
    test = df[df["split"] == "test"]
    if test.empty:
        raise DataError(f"{data_dir}: the test split is empty; nothing to evaluate")
    device = resolve_device(params.finetune.device)
    model, spec = load_classifier(Path(model_dir), device)
    if tuple(spec.classes) != tuple(info.classes):
        raise DataError(f"{model_dir} was trained on classes {list(spec.classes)}, the data has {list(info.classes)}")
    y = encode_targets(label_lists(test), info.classes, info.multilabel)
    dataset = ImageDataset(
        Path(info.root),
        test["path"].tolist(),
        eval_transform(spec.image_size, params.augment),
        y,
        params.data.max_image_pixels,
    )
    workers = resolve_num_workers(params.finetune.num_workers, device)
    loader = make_loader(dataset, params.evaluate.batch_size, shuffle=False, num_workers=workers, seed=0)
    probs = predict_probs(model, loader, info.multilabel, device)
    metrics = classification_metrics(y, probs, info.classes, info.multilabel, params.evaluate.threshold)
    metrics = {
        "network": spec.network,
        "arch": spec.arch,
        "data_version": info.data_version,
        "git_commit": git_commit(),
        **metrics,
    }

    out.out_dir.mkdir(parents=True, exist_ok=True)
    pred = pd.DataFrame(probs, columns=[f"p_{c}" for c in info.classes])
    pred.insert(0, "labels", test["labels"].to_numpy())
    pred.insert(0, "path", test["path"].to_numpy())
    atomic_write_text(out.predictions, pred.to_csv(index=False, float_format="%.6f"))
    _plot_confusion(metrics, info.classes, info.multilabel, out.confusion_matrix, spec.network)
    _plot_roc(y, probs, info.classes, info.multilabel, out.roc, spec.network)
    atomic_write_text(out.metrics, json.dumps(_json_safe(metrics), indent=2) + "\n")
    return out


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_confusion(metrics: dict, classes, multilabel: bool, path: Path, title: str) -> None:
    plt = _figure()
    if multilabel:
        cms = [np.asarray(metrics["per_class"][c]["confusion_matrix"]) for c in classes]
        fig, axes = plt.subplots(1, len(classes), figsize=(2.6 * len(classes), 2.8), squeeze=False)
        for ax, c, cm in zip(axes[0], classes, cms, strict=True):
            ax.imshow(cm, cmap="Blues")
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center")
            ax.set_title(c)
            ax.set_xticks([0, 1], ["0", "1"])
            ax.set_yticks([0, 1], ["0", "1"])
    else:
        cm = np.asarray(metrics["confusion_matrix"])
        size = 1.2 + 0.7 * len(classes)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: macro F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_roc(y: np.ndarray, probs: np.ndarray, classes, multilabel: bool, path: Path, title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, c in enumerate(classes):
        truth = y[:, i] if multilabel else (y == i)
        if truth.all() or not truth.any():
            continue
        fpr, tpr = roc_curve(truth, probs[:, i])
        ax.plot(fpr, tpr, label=c)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title}: ROC (one-vs-rest)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
