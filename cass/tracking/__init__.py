"""MLflow tracking: where runs go, what they carry, and the tracked stages of the pipeline.

    redact   secrets never reach MLflow (URI passwords, secret settings, params.yaml lines)
    client   the tracking URI, the server check before any training, the experiment, bounded calls,
             retried uploads, the runs a dead server left open
    tags     the lineage tags every run carries and the labels runs are named by
    runs     RunLogger: logging into one run, by id
    plots    the curves PNG of a training stage
    pipeline_runs  a pipeline's parent run and its child runs
    tracker  MlflowTracker, the handler the stages of :mod:`cass.stages` log through (and a study's runs)
    stages   the pipeline's MLflow steps: unchanged-run look-up, data change, registration and promotion

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
    ui_url,
    where_to_browse,
    with_retries,
)
from cass.tracking.pipeline_runs import child_run, end_pipeline_run, stage_run, start_pipeline_run
from cass.tracking.plots import plot_history
from cass.tracking.redact import REDACTED, loggable_params, redact, redact_mapping, redact_yaml_text
from cass.tracking.runs import RunLogger, metric_key, numeric_items
from cass.tracking.stages import (
    DataChange,
    champions,
    completed_run,
    data_change,
    first_test_image,
    log_quality,
    promote_candidate,
    register_candidate,
    register_outputs,
    reusable_pretraining,
)
from cass.tracking.tags import (
    LineageTags,
    changed_settings,
    data_digest,
    label_of,
    networks_tag,
    pipeline_lineage,
    run_label,
    run_name,
    run_tags,
    test_set_hash,
)
from cass.tracking.tracker import MlflowTracker, StudyRuns

__all__ = [
    "EVALUATION_DIR",
    "METRICS_ARTIFACT",
    "REDACTED",
    "DataChange",
    "LineageTags",
    "MlflowTracker",
    "RunLogger",
    "StudyRuns",
    "TrackingError",
    "champions",
    "changed_settings",
    "check_tracking_server",
    "child_run",
    "completed_run",
    "configure",
    "configure_client",
    "data_change",
    "data_digest",
    "end_pipeline_run",
    "experiment_id",
    "first_test_image",
    "is_server",
    "is_tracking_failure",
    "label_of",
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
    "run_name",
    "run_tags",
    "stage_run",
    "start_pipeline_run",
    "test_set_hash",
    "tracking_error",
    "tracking_uri",
    "ui_url",
    "where_to_browse",
    "with_retries",
]
