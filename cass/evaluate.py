"""Stage ``evaluate``: test-split metrics, calibration, explanations and subgroup metrics of one fine-tuned network.

Probabilities are those the served model returns: the logits divided by the temperature fitted on the
validation split (:mod:`cass.calibration`), and, for multi-label data, decided at the per-label thresholds
stored with the model. The ECE is reported before and after that scaling.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cass.calibration import (
    collect_logits,
    expected_calibration_error,
    plot_reliability,
    probabilities,
    reliability_table,
)
from cass.classifier import ClassifierSpec, load_classifier
from cass.config import Params
from cass.data.dataset import ImageDataset, encode_targets, make_loader
from cass.data.manifest import SPLITS, label_lists, read_manifest
from cass.data.transforms import eval_transform
from cass.engine import file_digest
from cass.errors import DataError
from cass.io import atomic_path, atomic_write_text, output_set
from cass.lineage import git_commit
from cass.metrics import classification_metrics, roc_curve
from cass.names import SCORE_METRICS
from cass.outputs import EvaluateOutputs, FinetuneOutputs
from cass.training import resolve_device, resolve_num_workers

log = logging.getLogger(__name__)


def evaluate(params: Params, data_dir: Path, model_dir: Path, out_dir: Path) -> EvaluateOutputs:
    """Score the fine-tuned model in ``model_dir`` on the test split: metrics.json (every metric),
    scores.json (the headline numbers), lineage.json (which model, commit and data) and the plots."""
    out = EvaluateOutputs(Path(out_dir))
    df, info = read_manifest(Path(data_dir))
    test = df[df["split"] == "test"].reset_index(drop=True)
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
    logits, _ = collect_logits(model, loader, device)
    raw = probabilities(logits, info.multilabel)
    probs = probabilities(logits, info.multilabel, spec.temperature)  # what the served model returns
    threshold = decision_threshold(spec, params)
    metrics = classification_metrics(y, probs, info.classes, info.multilabel, threshold)
    bins = params.evaluate.ece_bins
    ece_raw = expected_calibration_error(raw, y, info.multilabel, bins)
    ece = expected_calibration_error(probs, y, info.multilabel, bins)
    metrics = {**metrics, "temperature": spec.temperature, "ece": ece, "ece_before_scaling": ece_raw}
    lineage = {  # which model, at which commit, on which data: apart from the numbers
        "network": spec.network,
        "arch": spec.arch,
        "model_sha256": file_digest(FinetuneOutputs(Path(model_dir)).weights),
        "data_version": info.data_version,
        "git_commit": git_commit(),
        "num_samples": len(test),
    }

    # One set: a kill or a full disk leaves the previous evaluation whole (cass.io.output_set); a file this run
    # does not write (subgroups.csv, explanations.png under other settings) does not linger from an earlier one.
    with output_set(out.out_dir) as staging:
        staged = EvaluateOutputs(staging)
        if params.data.group_columns:
            from cass.subgroups import read_groups, subgroup_table, worst_group_gap

            groups = read_groups(params, test["path"].tolist(), Path(info.root))
            table = subgroup_table(y, probs, groups, info.multilabel, threshold, params.evaluate.min_subgroup_size)
            atomic_write_text(staged.subgroups, table.to_csv(index=False, float_format="%.6f"))
            metrics.update(worst_group_gap(table))
        pred = pd.DataFrame(probs, columns=[f"p_{c}" for c in info.classes])
        pred.insert(0, "labels", test["labels"].to_numpy())
        pred.insert(0, "path", test["path"].to_numpy())
        atomic_write_text(staged.predictions, pred.to_csv(index=False, float_format="%.6f"))
        atomic_write_text(staged.class_counts, class_counts(df, info.classes).to_csv(index=False))
        _plot_confusion(metrics, info.classes, info.multilabel, staged.confusion_matrix, spec.network)
        _plot_roc(y, probs, info.classes, info.multilabel, staged.roc, spec.network)
        before, after = (reliability_table(p, y, info.multilabel, bins) for p in (raw, probs))
        tables = pd.concat([before.assign(scaling="raw"), after.assign(scaling=f"temperature {spec.temperature:g}")])
        atomic_write_text(staged.reliability_table, tables.to_csv(index=False, float_format="%.6f"))
        plot_reliability(before, after, ece_raw, ece, spec.temperature, staged.reliability, spec.network,
                         info.multilabel)
        if params.evaluate.explain_per_class:
            _explanations(params, dataset, test, model, spec, device, staged.explanations)
        atomic_write_text(staged.lineage, json.dumps(lineage, indent=2) + "\n")
        atomic_write_text(staged.metrics, json.dumps(_json_safe(metrics), indent=2) + "\n")
        atomic_write_text(staged.scores, json.dumps(_json_safe(headline(metrics)), indent=2) + "\n")
    log.info("%s: test macro F1 %.3f, ECE %.3f -> %.3f at temperature %.3f", spec.network, metrics["macro_f1"],
             ece_raw, ece, spec.temperature)
    return out


HEADLINE = (*SCORE_METRICS, "ece", "subgroup_gap", "num_samples")


def headline(metrics: dict) -> dict:
    """The few test numbers worth a column in ``dvc metrics show`` / ``dvc exp show`` (scores.json); the
    per-class scores and the confusion matrix stay in metrics.json."""
    return {k: metrics[k] for k in HEADLINE if k in metrics}


def decision_threshold(spec: ClassifierSpec, params: Params) -> float | tuple[float, ...]:
    """Multi-label decisions: the per-label thresholds stored with the model, else ``evaluate.threshold``."""
    if spec.multilabel and spec.thresholds is not None:
        return spec.thresholds
    return params.evaluate.threshold


def class_counts(df: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """Images per class (rows) and split (columns), from the manifest."""
    counts = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    for labels, split in zip(label_lists(df), df["split"], strict=True):
        for c in labels:
            if split in counts and c in counts[split]:
                counts[split][c] += 1
    table = pd.DataFrame({"class": list(classes), **{s: [counts[s][c] for c in classes] for s in SPLITS}})
    return table


def explanation_sample(test: pd.DataFrame, classes: tuple[str, ...], per_class: int, seed: int) -> list[int]:
    """Row positions of up to ``per_class`` test images per class, drawn with ``seed`` (the same every run)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    labels = label_lists(test)
    for c in classes:
        rows = [i for i, names in enumerate(labels) if c in names and i not in chosen]
        if rows:
            chosen.extend(int(i) for i in rng.choice(rows, size=min(per_class, len(rows)), replace=False))
    return chosen


def _explanations(params: Params, dataset: ImageDataset, test: pd.DataFrame, model, spec: ClassifierSpec,
                  device, path: Path) -> None:
    from cass.explain import Explained, heat_maps, method_name, save_panel, to_display

    rows = explanation_sample(test, spec.classes, params.evaluate.explain_per_class, params.seed)
    x = torch.stack([dataset[i][0] for i in rows]).to(device)
    method = params.evaluate.vit_explainer
    heat, logits = heat_maps(model, spec.network, x, method)
    probs = probabilities(logits.cpu().numpy(), spec.multilabel, spec.temperature)
    items = []
    for k, i in enumerate(rows):
        best = int(probs[k].argmax())
        items.append(Explained(to_display(x[k], spec.mean, spec.std), heat[k], spec.classes[best],
                               float(probs[k, best]), truth=str(test["labels"].iloc[i]),
                               name=str(test["path"].iloc[i])))
    per_row = max(1, min(params.evaluate.explain_per_class, 3))
    save_panel(items, path, f"{spec.network} ({spec.arch}): {method_name(spec.network, method)}, test images",
               per_row=per_row)


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
