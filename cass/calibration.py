"""Are the probabilities honest? Expected calibration error, reliability tables and temperature scaling.

A classifier is *calibrated* when, of the images it gives probability 0.8, 80 % are right. Modern networks
trained to a low loss are over-confident (Guo et al. 2017, "On Calibration of Modern Neural Networks").
The fix used here is theirs: **temperature scaling**, one scalar ``T`` that divides the logits, fitted by
minimising the negative log-likelihood on the validation split after fine-tuning. It never changes which
class ranks first, so accuracy and F1 of single-label models stay the same; only the probabilities move.

- Single-label: the ECE bins each image's top-class probability (its confidence) into ``n_bins`` equal-width
  bins over [0, 1] and averages |accuracy - confidence| weighted by the share of images in each bin.
- Multi-label: every (image, label) probability is a binary prediction; the ECE bins the probabilities
  themselves and compares each bin's mean probability with its fraction of positives. One temperature is
  fitted for all labels (binary cross-entropy). Decisions then need a threshold per label:
  ``evaluate.threshold_rule: max_f1`` picks, for each label, the threshold in 0.05, 0.10, ..., 0.95 that
  maximises that label's F1 on the calibrated validation probabilities (ties: the one closest to
  ``evaluate.threshold``); a label without both positives and negatives in validation keeps
  ``evaluate.threshold``. ``fixed`` uses ``evaluate.threshold`` for every label.

The fitted temperature and thresholds are stored in the classifier's ``model.json``, so evaluation and the
served MLflow model (:mod:`cass.serving`) apply exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

if TYPE_CHECKING:
    from cass.classifier import ClassifierSpec
    from cass.config import EvaluateConfig

log = logging.getLogger(__name__)

THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
TEMPERATURE_RANGE = (0.05, 20.0)


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """The float64 logits and the targets of every batch of ``loader``, in order."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits).double().numpy(), torch.cat(targets).numpy()


def probabilities(logits: np.ndarray, multilabel: bool, temperature: float = 1.0) -> np.ndarray:
    """Softmax (or per-label sigmoid) of ``logits / temperature``, computed as the served model does (float32)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float32) / float(temperature)
    return (torch.sigmoid(z) if multilabel else torch.softmax(z, dim=-1)).numpy().astype(np.float64)


def _confidence_and_hit(probs: np.ndarray, y: np.ndarray, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if multilabel:
        return probs.ravel(), np.asarray(y, dtype=np.float64).ravel()
    y = np.asarray(y).astype(int)
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)


def reliability_table(probs: np.ndarray, y: np.ndarray, multilabel: bool, n_bins: int = 15) -> pd.DataFrame:
    """One row per equal-width bin ``(lower, upper]`` (the first also holds 0): count, mean confidence, accuracy
    (fraction correct, or of positives for multi-label), their gap and the bin's weight in the ECE."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf, hit = _confidence_and_hit(probs, y, multilabel)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        confidence = float(conf[inside].mean()) if count else float("nan")
        accuracy = float(hit[inside].mean()) if count else float("nan")
        rows.append({
            "bin": b + 1,
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": count,
            "confidence": confidence,
            "accuracy": accuracy,
            "gap": abs(accuracy - confidence) if count else float("nan"),
            "weight": count / max(len(conf), 1),
        })
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, multilabel: bool, n_bins: int = 15) -> float:
    """sum over bins of (share of predictions in the bin) x |accuracy - mean confidence|."""
    table = reliability_table(probs, y, multilabel, n_bins)
    filled = table[table["count"] > 0]
    return float((filled["weight"] * filled["gap"]).sum())


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray, multilabel: bool, temperature: float) -> float:
    """Mean NLL of ``y`` under ``logits / temperature`` (cross-entropy, or binary cross-entropy per label)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / float(temperature)
    if multilabel:
        target = torch.as_tensor(np.asarray(y), dtype=torch.float64)
        return float(nn.functional.binary_cross_entropy_with_logits(z, target))
    return float(nn.functional.cross_entropy(z, torch.as_tensor(np.asarray(y), dtype=torch.long)))


def fit_temperature(logits: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """The temperature minimising the validation NLL, searched over log T in :data:`TEMPERATURE_RANGE`.

    The NLL is smooth and unimodal in log T for a fixed set of logits, so a bounded scalar search finds it
    deterministically (no learning rate, no iterations to tune, unlike L-BFGS on a parameter)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, y, multilabel, float(np.exp(log_t))),
        bounds=(low, high), method="bounded", options={"xatol": 1e-4},
    )
    temperature = float(np.exp(result.x))
    # Never return something worse than no scaling (a flat NLL near T = 1 on tiny validation sets).
    nll = negative_log_likelihood
    if nll(logits, y, multilabel, temperature) > nll(logits, y, multilabel, 1.0):
        return 1.0
    return round(temperature, 6)


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float((truth & pred).sum())
    denominator = float(truth.sum() + pred.sum())
    return 2 * tp / denominator if denominator else 0.0


def choose_thresholds(probs: np.ndarray, y: np.ndarray, default: float, rule: str) -> tuple[float, ...]:
    """Per-label decision thresholds for multi-label probabilities (the rule in the module docstring)."""
    probs, truth = np.asarray(probs, dtype=np.float64), np.asarray(y).astype(bool)
    thresholds = []
    for j in range(probs.shape[1]):
        column = truth[:, j]
        if rule == "fixed" or column.all() or not column.any():
            thresholds.append(float(default))
            continue
        scores = [(_f1(column, probs[:, j] >= t), -abs(t - default), t) for t in THRESHOLD_GRID]
        thresholds.append(float(max(scores)[2]))
    return tuple(thresholds)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What fitting on the validation split found: the temperature, the thresholds and the NLL it saved."""

    temperature: float
    thresholds: tuple[float, ...] | None
    nll_before: float
    nll_after: float


def fit(logits: np.ndarray, y: np.ndarray, multilabel: bool, cfg: EvaluateConfig) -> Calibration:
    """Temperature (when ``cfg.calibrate``) and, for multi-label data, per-label thresholds from validation."""
    temperature = fit_temperature(logits, y, multilabel) if cfg.calibrate else 1.0
    thresholds = None
    if multilabel:
        thresholds = choose_thresholds(probabilities(logits, True, temperature), y, cfg.threshold, cfg.threshold_rule)
    return Calibration(
        temperature,
        thresholds,
        negative_log_likelihood(logits, y, multilabel, 1.0),
        negative_log_likelihood(logits, y, multilabel, temperature),
    )


def calibrate_classifier(
    model: nn.Module, val_loader: torch.utils.data.DataLoader, spec: ClassifierSpec, cfg: EvaluateConfig,
    device: torch.device | str,
) -> ClassifierSpec:
    """``spec`` with the temperature and thresholds fitted on ``val_loader`` (the fine-tuning hook)."""
    logits, y = collect_logits(model, val_loader, device)
    found = fit(logits, y, spec.multilabel, cfg)
    log.info("calibration of %s on %d validation images: temperature %.3f (NLL %.4f -> %.4f)%s", spec.network,
             len(y), found.temperature, found.nll_before, found.nll_after,
             f", thresholds {list(found.thresholds)}" if found.thresholds else "")
    return dataclasses.replace(spec, temperature=found.temperature, thresholds=found.thresholds)


def plot_reliability(before: pd.DataFrame, after: pd.DataFrame, ece_before: float, ece_after: float,
                     temperature: float, path: Path, title: str, multilabel: bool) -> Path:
    """Reliability diagram: accuracy per confidence bin before and after temperature scaling, and the bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cass.io import atomic_path

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = float(before["upper"].iloc[0] - before["lower"].iloc[0])
    centres = (before["lower"] + before["upper"]).to_numpy() / 2
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfectly calibrated")
    ax.bar(centres, before["accuracy"].fillna(0), width=width, color="#c8553d", alpha=0.45, edgecolor="#c8553d",
           label=f"raw (ECE {ece_before:.3f})")
    ax.bar(centres, after["accuracy"].fillna(0), width=width * 0.55, color="#2d6a9f", alpha=0.85,
           label=f"T = {temperature:.2f} (ECE {ece_after:.3f})")
    ax.set_ylabel("fraction positive" if multilabel else "accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: reliability on the test split")
    ax.legend(fontsize=8, loc="upper left")
    hist.bar(centres, before["count"], width=width, color="#c8553d", alpha=0.45, label="raw")
    hist.bar(centres, after["count"], width=width * 0.55, color="#2d6a9f", alpha=0.85, label="scaled")
    hist.set_xlabel("predicted probability" if multilabel else "confidence (top-class probability)")
    hist.set_ylabel("count")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
