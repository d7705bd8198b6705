"""MLflow tracking: where runs go, what they carry, and the tracked stages of the pipeline.

    redact   secrets never reach MLflow (URI passwords, secret settings, params.yaml lines)
    client   the tracking URI, the server check before any training, the experiment, bounded calls,
             retried uploads, the runs a dead server left open
    runs     lineage tags, RunLogger (one run, by id), the pipeline's parent and child runs
    stages   the tracked pretrain / fine-tune / evaluate stages, registration and promotion

It sits above :mod:`cass.registry` (which never imports it) and below :mod:`cass.pipeline`, which runs
the stages in order. mlflow itself is imported only where it is used, never when this package loads.
"""

from cass.registry import EVALUATION_DIR, METRICS_ARTIFACT
from cass.tracking.client import (
    TrackingError,
    check_tracking_server,
    configure,
    configure_client,
    experiment_id,
    is_server,
    is_tracking_failure,
    latest_run_id,
    reaching,
    reset_client,
    tracking_error,
    tracking_uri,
    with_retries,
)
from cass.tracking.redact import REDACTED, loggable_params, redact, redact_mapping, redact_yaml_text
from cass.tracking.runs import (
    Lineage,
    RunLogger,
    changed_settings,
    child_run,
    data_digest,
    end_pipeline_run,
    metric_key,
    networks_tag,
    numeric_items,
    pipeline_lineage,
    plot_history,
    run_label,
    run_tags,
    stage_run,
    start_pipeline_run,
    test_set_hash,
)
from cass.tracking.stages import (
    FinetuneRun,
    StageRun,
    champions,
    completed_run,
    first_test_image,
    log_quality,
    promote_candidate,
    register_candidate,
    register_outputs,
    reusable_pretraining,
    tracked_evaluate,
    tracked_finetune,
    tracked_pretrain,
)

__all__ = [
    "EVALUATION_DIR",
    "METRICS_ARTIFACT",
    "REDACTED",
    "FinetuneRun",
    "Lineage",
    "RunLogger",
    "StageRun",
    "TrackingError",
    "champions",
    "changed_settings",
    "check_tracking_server",
    "child_run",
    "completed_run",
    "configure",
    "configure_client",
    "data_digest",
    "end_pipeline_run",
    "experiment_id",
    "first_test_image",
    "is_server",
    "is_tracking_failure",
    "latest_run_id",
    "log_quality",
    "loggable_params",
    "metric_key",
    "networks_tag",
    "numeric_items",
    "pipeline_lineage",
    "plot_history",
    "promote_candidate",
    "reaching",
    "redact",
    "redact_mapping",
    "redact_yaml_text",
    "register_candidate",
    "register_outputs",
    "reset_client",
    "reusable_pretraining",
    "run_label",
    "run_tags",
    "stage_run",
    "start_pipeline_run",
    "test_set_hash",
    "tracked_evaluate",
    "tracked_finetune",
    "tracked_pretrain",
    "tracking_error",
    "tracking_uri",
    "with_retries",
]
