"""Classification metrics, computed from scratch with numpy and named for what they are.

(The public CASS notebook reported recall under the name F1; here macro F1, balanced accuracy,
per-class recall and AUROC are separate numbers.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class (0 where undefined, as scikit-learn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return precision, recall, f1


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic, with ties averaged. NaN if one class only."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score, dtype=np.float64)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_of = np.empty_like(ranks)
    rank_of[order] = ranks
    return float((rank_of[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (for plots)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score), kind="mergesort")
    tps = np.cumsum(y[order])
    fps = np.cumsum(~y[order])
    keep = np.r_[np.flatnonzero(np.diff(np.asarray(score)[order])), len(order) - 1]
    tpr = np.r_[0.0, tps[keep] / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps[keep] / max(fps[-1], 1)]
    return fpr, tpr


def single_label_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Metrics for one label per image; ``probs`` is (N, K) softmax output."""
    k = len(classes)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    precision, recall, f1 = per_class_scores(cm)
    present = cm.sum(axis=1) > 0
    aurocs = np.array([binary_auroc(y_true == c, probs[:, c]) for c in range(k)])
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_auroc": float(np.nanmean(aurocs)) if not np.isnan(aurocs).all() else float("nan"),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "auroc": float(aurocs[i]),
                "support": int(cm[i].sum()),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "num_samples": len(y_true),
    }


def multi_label_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], threshold: float | Sequence[float]
) -> dict:
    """Per-label binary metrics at ``threshold`` (one for all labels, or one per label), then macro averages;
    ``probs`` are sigmoid outputs."""
    per_label = np.ndim(threshold) > 0
    cut = np.asarray(threshold, dtype=np.float64)
    if per_label and cut.shape != (len(classes),):
        raise ValueError(f"got {cut.size} thresholds for {len(classes)} labels")
    pred = probs >= cut
    truth = np.asarray(y_true).astype(bool)
    scores, f1s, baccs, aurocs = {}, [], [], []
    for i, c in enumerate(classes):
        cm = confusion_matrix(truth[:, i], pred[:, i], 2)
        precision, recall, f1 = per_class_scores(cm)
        present = cm.sum(axis=1) > 0
        bacc = float(recall[present].mean()) if present.any() else 0.0
        auc = binary_auroc(truth[:, i], probs[:, i])
        scores[c] = {
            "precision": float(precision[1]),
            "recall": float(recall[1]),
            "f1": float(f1[1]),
            "balanced_accuracy": bacc,
            "auroc": auc,
            "support": int(truth[:, i].sum()),
            "confusion_matrix": cm.tolist(),
            **({"threshold": float(cut[i])} if per_label else {}),
        }
        f1s.append(f1[1])
        baccs.append(bacc)
        aurocs.append(auc)
    aurocs_arr = np.asarray(aurocs)
    return {
        "exact_match": float((pred == truth).all(axis=1).mean()),
        "macro_f1": float(np.mean(f1s)),
        "balanced_accuracy": float(np.mean(baccs)),
        "macro_auroc": float(np.nanmean(aurocs_arr)) if not np.isnan(aurocs_arr).all() else float("nan"),
        **({} if per_label else {"threshold": float(threshold)}),
        "per_class": scores,
        "num_samples": len(truth),
    }


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], multilabel: bool,
    threshold: float | Sequence[float] = 0.5,
) -> dict:
    if multilabel:
        return multi_label_metrics(y_true, probs, classes, threshold)
    return single_label_metrics(y_true, probs, classes)
