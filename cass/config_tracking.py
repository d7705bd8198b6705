"""Settings of what judges, records and ships a model: evaluation, MLflow tracking and the registry, the
quality gates, the retraining flow and its notifications, and the model card."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cass.config_base import AUTO, Section
from cass.errors import did_you_mean
from cass.names import (
    MULTI_LABEL_METRICS,
    QUALITY_CHECKS,
    SINGLE_LABEL_METRICS,
    PromotionMetric,
    Severity,
    task_metrics,
    unwritten_metrics,
)


class EvaluateConfig(Section):
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="multi-label decision threshold")
    batch_size: int = Field(default=64, ge=1)
    calibrate: bool = Field(
        default=True, description="fit a temperature on the validation split after fine-tuning; served and "
        "evaluated probabilities use it (cass.calibration)"
    )
    threshold_rule: Literal["fixed", "max_f1"] = Field(
        default="max_f1", description="multi-label: per-label thresholds maximising validation F1 (max_f1), or "
        "evaluate.threshold for every label (fixed)"
    )
    ece_bins: int = Field(default=15, ge=2, le=100, description="equal-width confidence bins of the ECE")
    explain_per_class: int = Field(
        default=2, ge=0, le=20, description="seeded test images per class in the explanation panel; 0 = none"
    )
    vit_explainer: Literal["gradcam", "rollout"] = Field(
        default="gradcam", description="ViT heat maps: Grad-CAM over the patch tokens or attention rollout"
    )
    min_subgroup_size: int = Field(
        default=10, ge=1, description="subgroups with fewer test images are listed but left out of the gap"
    )


class MlflowConfig(Section):
    """Tracking and registry. The demo uses a local SQLite store and artifact folder (no server);
    production points ``tracking_uri`` (or the MLFLOW_TRACKING_URI variable, which wins) at a server."""

    tracking_uri: str = Field(default="sqlite:///mlflow.db", description="overridden by MLFLOW_TRACKING_URI")
    artifact_location: str | None = Field(
        default="mlruns", description="artifact root for new experiments when the store is local"
    )
    experiment: str = "cass"
    model_prefix: str = Field(
        default=AUTO,
        description="registered models are <prefix>-cnn, <prefix>-vit; auto: cass-<data.name>, so that models of "
        "different datasets are never versions of one registered model",
    )
    server_timeout_s: float = Field(
        default=5.0, gt=0.0, description="how long to wait for the tracking server before giving up (before training)"
    )
    artifact_retries: int = Field(default=3, ge=1, description="attempts per artifact/model upload")
    artifact_retry_delay_s: float = Field(default=2.0, ge=0.0, description="first retry delay; doubles each time")
    # MLflow's own HTTP client (MLFLOW_HTTP_REQUEST_*, which win when set): a call to a dead server gives up
    # after about (http_retries + 1) x http_timeout_s plus the back-off, instead of MLflow's ~4 minutes.
    http_timeout_s: int = Field(default=30, ge=1, description="seconds per HTTP request to the tracking server")
    http_retries: int = Field(default=3, ge=0, le=10, description="retries of a failed HTTP request")
    http_backoff_factor: int = Field(
        default=1, ge=0, le=120, description="retry back-off: factor x 2^(n-1) s before the n-th retry (n >= 2)"
    )
    open_runs_file: str = Field(
        default="mlflow-open-runs.json",
        description="runs left open when the tracking server stopped answering; closed at the next start",
    )
    promotion_metric: PromotionMetric = Field(
        default="macro_f1", description="test metric a candidate must improve to become champion"
    )
    promotion_margin: float = Field(
        default=0.01, gt=0.0, le=1.0, description="candidate - champion must be at least this on the same test set"
    )
    lock_timeout_s: float = Field(default=120.0, gt=0.0, description="wait this long for another promotion")
    lock_stale_s: float = Field(
        default=900.0, gt=0.0, description="a promotion lock older than this was left by a dead process; broken"
    )
    system_metrics_interval_s: float = Field(
        default=2.0, ge=0.0, description="training runs sample CPU, memory (and GPU) every this many seconds into "
        "system/* metrics; 0 = off. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins when set"
    )


ALL_MODES = ("RGB", "RGBA", "L", "LA", "P", "I;16", "I;16B", "I;16L", "I", "F")
"""Pillow modes the loader converts to 8-bit RGB faithfully (cass.data.images.to_rgb8)."""


def metrics_fix(metrics: Iterable[str], multilabel: bool) -> str:
    """The sentence that says which metrics a task lacks and the value of quality.expected_metrics to set."""
    wrong = unwritten_metrics(metrics, multilabel)
    task = "multi-label" if multilabel else "single-label"
    return (
        f"quality.expected_metrics lists {wrong}, which evaluation of {task} data does not write, so the model "
        f"gate would fail after training; set quality.expected_metrics: auto (here {list(task_metrics(multilabel))})"
    )


class QualityConfig(Section):
    """Thresholds and severities of the Great Expectations gates (``cass validate manifest|splits|model``)."""

    min_width: int = Field(default=16, ge=1, description="narrowest image accepted, in pixels")
    max_width: int = Field(default=16384, ge=1)
    min_height: int = Field(default=16, ge=1)
    max_height: int = Field(default=16384, ge=1)
    allowed_modes: tuple[str, ...] = Field(
        default=ALL_MODES,
        description="Pillow modes accepted (default: every mode the loader converts to 8-bit RGB faithfully)",
    )
    min_images_per_class: int = Field(default=5, ge=1, description="fewer images than this in a class fails")
    imbalance_warn_ratio: float = Field(default=10.0, ge=1.0, description="largest/smallest class count: warn above")
    imbalance_fail_ratio: float = Field(default=100.0, ge=1.0, description="largest/smallest class count: fail above")
    expected_metrics: tuple[str, ...] | Literal["auto"] = Field(
        default=AUTO,
        description="keys the evaluation metrics.json must hold, each a number in [0, 1]; auto: every metric "
        "evaluation writes for the data's task (accuracy for single-label, exact_match for multi-label data)",
    )
    min_macro_f1: float = Field(default=0.5, ge=0.0, le=1.0, description="test macro F1 floor")
    min_balanced_accuracy: float = Field(default=0.5, ge=0.0, le=1.0, description="test balanced accuracy floor")
    max_ece: float | None = Field(
        default=None, gt=0.0, le=1.0, description="ceiling on the test ECE after temperature scaling; null = none"
    )
    max_subgroup_gap: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="ceiling on the worst subgroup's shortfall (macro F1 or balanced accuracy) below the whole "
        "test split; needs data.group_columns; null = none",
    )
    severity: dict[str, Severity] = Field(
        default_factory=dict, description="check name -> warn | fail, overriding the defaults (QUALITY_CHECKS)"
    )
    max_examples: int = Field(default=5, ge=1, le=100, description="offending rows shown per failed check")
    model_gate_policy: Literal["per_network", "all"] = Field(
        default="per_network",
        description="per_network: each network that passes the model gate is registered and promoted on its own; "
        "all: nothing is registered unless every network passes",
    )

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, v: dict[str, Severity]) -> dict[str, Severity]:
        for name in v:
            if name not in QUALITY_CHECKS:
                raise ValueError(f"unknown check '{name}'{did_you_mean(name, QUALITY_CHECKS)} Known: "
                                 f"{', '.join(QUALITY_CHECKS)}")
        return v

    @field_validator("expected_metrics")
    @classmethod
    def _known_metrics(cls, v: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if v == AUTO:
            return v
        known = list(dict.fromkeys((*SINGLE_LABEL_METRICS, *MULTI_LABEL_METRICS)))
        for name in v:
            if name not in known:
                hint = did_you_mean(name, known)
                raise ValueError(f"unknown metric '{name}'{hint} Known: {', '.join(known)}, or auto")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> QualityConfig:
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("quality.min_width/min_height must not exceed max_width/max_height")
        if self.imbalance_warn_ratio > self.imbalance_fail_ratio:
            raise ValueError(
                f"quality.imbalance_warn_ratio {self.imbalance_warn_ratio} exceeds imbalance_fail_ratio "
                f"{self.imbalance_fail_ratio}; the warning level must come first"
            )
        return self

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, QUALITY_CHECKS[check])


class NotifyConfig(Section):
    """Who hears about a retraining run that failed or whose challenger was refused (flows/notify.py).

    The message goes to a Prefect notification block: a saved one (``block``: Slack, Teams, e-mail, any
    ``<type>/<name>`` from ``prefect block ls``) or, by default, a webhook whose URL (a secret: Slack's
    carries its token) comes from the environment, never from this file."""

    events: list[Literal["failed", "refused"]] = Field(
        default=["failed", "refused"], description="what notifies: a failed or crashed run, a refused challenger"
    )
    block: str | None = Field(
        default=None, description="a saved Prefect notification block, '<block-type-slug>/<name>'; "
        "null = the webhook of webhook_url_env"
    )
    webhook_url_env: str = Field(
        default="CASS_NOTIFY_WEBHOOK_URL",
        description="environment variable holding the webhook URL; unset = no notification",
    )
    webhook_token_env: str = Field(
        default="CASS_NOTIFY_WEBHOOK_TOKEN",
        description="environment variable holding a bearer token sent to the webhook, if the receiver wants one",
    )
    timeout_s: float = Field(default=10.0, gt=0.0, description="seconds the webhook may take to answer")


class RetrainConfig(Section):
    """The Prefect retraining flow (``flows/retrain.py``): retries of its I/O tasks and its concurrency slot.

    Only I/O is retried (``dvc pull``, MLflow run creation, uploads, registration, promotion): a training
    step that failed for a real reason would fail again and waste GPU hours."""

    io_retries: int = Field(default=4, ge=0, description="retries of an I/O task after its first attempt")
    io_retry_delay_s: float = Field(default=10.0, ge=0.0, description="delay before the first retry; doubles")
    io_retry_max_delay_s: float = Field(default=300.0, ge=0.0, description="cap on one retry delay")
    concurrency_limit: str | None = Field(
        default="cass-retrain",
        description="Prefect global concurrency limit held by a retraining run (create it with limit 1); null = none",
    )
    parallel_finetune: Literal["auto", "always", "never"] = Field(
        default="auto", description="fine-tune the networks at the same time; auto = when finetune.device is CUDA"
    )
    notify: NotifyConfig = NotifyConfig()


DEFAULT_INTENDED_USE = (
    "Research use: classifying {dataset} images into {classes}, as decision support read by a qualified "
    "person. Not a medical device and not validated for diagnosis."
)
DEFAULT_LIMITATIONS = (
    "Measured on one held-out test split of one dataset ({dataset}, data version {data_version}). Performance "
    "on other sites, scanners, stains or patient populations is unknown until measured there. Probabilities are "
    "calibrated on the validation split of the same data; calibration can drift on new data. Heat maps show "
    "where the network's evidence lies, not why, and are coarse (one cell per feature-map position)."
)


class CardConfig(Section):
    """The model card written for every registered version (cass.model_card). ``{dataset}``, ``{classes}``,
    ``{model}``, ``{version}``, ``{network}`` and ``{data_version}`` in the texts are filled in."""

    intended_use: str = Field(default=DEFAULT_INTENDED_USE, min_length=1, description="the card's intended use")
    limitations: str = Field(default=DEFAULT_LIMITATIONS, min_length=1, description="the card's limitations")
    file: str | None = Field(
        default=None, description="a markdown file (relative to the working directory) shown instead of "
        "intended_use and limitations, with the same placeholders"
    )
