"""The names the settings, the gates, evaluation and the registry share: the metrics evaluation writes and
the checks of the quality gates, each listed once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

Severity = Literal["warn", "fail"]

# Every check of the data and model gates (cass.quality) with its default severity. A failed "fail" check stops
# the pipeline; a failed "warn" check is reported and the run goes on. quality.severity overrides these.
QUALITY_CHECKS: dict[str, Severity] = {
    # manifest gate (before any training)
    "rows_present": "fail",
    "inside_root": "fail",
    "file_exists": "fail",
    "decodes": "fail",
    "file_unchanged": "fail",
    "width_in_bounds": "fail",
    "height_in_bounds": "fail",
    "mode_allowed": "fail",
    "has_label": "fail",
    "labels_known": "fail",
    "single_label": "fail",
    "hash_label_conflict": "fail",
    "min_images_per_class": "fail",
    "imbalance_warn": "warn",
    "imbalance_fail": "fail",
    # manifest gate, DICOM data (cass.quality.dicom_suite)
    "dicom_modality_expected": "fail",
    "dicom_photometric_allowed": "fail",
    "dicom_pixel_spacing_present": "warn",
    "dicom_pixel_spacing_consistent": "warn",
    "dicom_frame_size_consistent": "warn",
    "dicom_no_burned_in_annotation": "warn",
    # split gate (before fine-tuning)
    "split_known": "fail",
    "hash_one_split": "fail",
    "group_one_split": "fail",
    "class_in_every_split": "fail",
    "subset_in_train": "fail",
    # model gate (before registration and promotion)
    "metric_present": "fail",
    "metric_not_nan": "fail",
    "metric_in_range": "fail",
    "macro_f1_floor": "fail",
    "balanced_accuracy_floor": "fail",
    "class_recall_nonzero": "fail",
    "ece_ceiling": "fail",
    "subgroup_gap_ceiling": "fail",
}


PromotionMetric = Literal["macro_f1", "balanced_accuracy", "accuracy", "macro_auroc"]
"""The test metrics a promotion may compare (``mlflow.promotion_metric``); every registered version carries
each as a tag ``test_<name>``."""
PROMOTION_METRICS: tuple[str, ...] = get_args(PromotionMetric)

FLOOR_METRICS = ("macro_f1", "balanced_accuracy")
"""The metrics the model gate floors (quality.min_*) and the subgroup gap compares."""

SCORE_METRICS = ("macro_f1", "balanced_accuracy", "accuracy", "exact_match", "macro_auroc")
"""Every score in [0, 1] evaluation writes, single- or multi-label, in the order reports show them."""

SINGLE_LABEL_METRICS: tuple[str, ...] = PROMOTION_METRICS
MULTI_LABEL_METRICS = ("macro_f1", "balanced_accuracy", "exact_match", "macro_auroc")
"""The metrics in [0, 1] that evaluation writes (cass.metrics), per task; the model gate may require any of them."""


def task_metrics(multilabel: bool | None) -> tuple[str, ...]:
    """What ``quality.expected_metrics: auto`` stands for: every metric evaluation writes for the task, or
    those it writes for both when the settings alone do not tell the task (MedMNIST)."""
    if multilabel is None:
        return tuple(m for m in SINGLE_LABEL_METRICS if m in MULTI_LABEL_METRICS)
    return MULTI_LABEL_METRICS if multilabel else SINGLE_LABEL_METRICS


def unwritten_metrics(metrics: Iterable[str], multilabel: bool | None) -> list[str]:
    """The metrics of ``metrics`` that evaluation does not write for this task (none known when it is unknown)."""
    if multilabel is None:
        return []
    written = task_metrics(multilabel)
    return [m for m in metrics if m not in written]
