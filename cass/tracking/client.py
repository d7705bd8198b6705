"""Where runs go, and talking to that store: the tracking URI, a server check before any training, the
experiment, and retried uploads.

``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from params.yaml. The demo uses a local
store (``sqlite:///mlflow.db`` + the ``mlruns/`` artifact folder, no server); production points at an
MLflow server (PostgreSQL backend store, S3 artifacts proxied by the server). A server is checked with
a short timeout BEFORE any training starts, so a wrong address fails in seconds, not after hours.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse, urlunparse

from cass.config import MlflowConfig
from cass.errors import CassError
from cass.tracking.redact import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment's kind: MLflow 3's UI opens an experiment without one in its GenAI (traces) view; this
one holds training runs, so it opens on the runs table."""


class TrackingError(CassError):
    """The tracking server or the artifact store cannot be used."""

    exit_code = 6


def tracking_uri(cfg: MlflowConfig) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingError` unless the MLflow server at ``uri`` answers ``/health`` in ``timeout`` s.

    Local stores (SQLite, a folder) need no server and pass.
    """
    if not is_server(uri):
        return
    parsed = urlparse(uri)
    bare = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else ""))
    health = urlunparse(bare._replace(path=bare.path.rstrip("/") + "/health", query="", fragment=""))
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"the MLflow tracking server {redact(uri)} did not answer within {timeout:g} s ({problem}). Nothing "
        "was trained. Start the server, or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri (unset both to use "
        "the local store sqlite:///mlflow.db)."
    )


def _artifact_location(cfg: MlflowConfig, uri: str) -> str | None:
    loc = cfg.artifact_location
    if not loc:
        return None
    if "://" in loc:
        return loc
    if is_server(uri):
        return None  # the server decides (e.g. --artifacts-destination s3://...)
    return Path(loc).resolve().as_uri()


def configure_client(cfg: MlflowConfig) -> str:
    """Point MLflow (tracking and registry) at the store after checking it answers; returns the URI."""
    import mlflow

    uri = tracking_uri(cfg)
    check_tracking_server(uri, cfg.server_timeout_s)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that, or in a long-lived process (a worker
    # running several flows) the first run's URI would override every later run's settings.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


def reset_client() -> None:
    """Forget the store :func:`configure_client` chose; MLflow falls back to MLFLOW_TRACKING_URI or its default."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


def configure(cfg: MlflowConfig) -> str:
    """:func:`configure_client`, then make sure the experiment exists and is active; returns its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_client(cfg)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(cfg.experiment, _artifact_location(cfg, uri),
                                                         tags=EXPERIMENT_TAGS)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = client.get_experiment_by_name(cfg.experiment).experiment_id  # created meanwhile
        elif experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{cfg.experiment}' is deleted; restore it (`mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}`) or set mlflow.experiment to another name"
            )
        else:
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # an experiment made before; a kind set by hand stays
                if key not in experiment.tags:
                    client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {redact(uri)} refused the experiment '{cfg.experiment}': "
                            f"{redact(exc.message)}") from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def experiment_id(cfg: MlflowConfig) -> str | None:
    """The id of ``mlflow.experiment`` in the store, without creating it; None when it does not exist or is
    deleted."""
    import mlflow

    configure_client(cfg)
    experiment = mlflow.MlflowClient().get_experiment_by_name(cfg.experiment)
    return None if experiment is None or experiment.lifecycle_stage == "deleted" else experiment.experiment_id


def latest_run_id(cfg: MlflowConfig, filter_string: str) -> str | None:
    """The newest run of ``mlflow.experiment`` that matches ``filter_string``; None if there is none."""
    import mlflow

    experiment = experiment_id(cfg)
    if experiment is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [experiment], filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def with_retries(what: str, fn: Callable[[], T], cfg: MlflowConfig) -> T:
    """Run an upload, retrying with doubling delays; raise :class:`TrackingError` when every attempt failed."""
    delay = cfg.artifact_retry_delay_s
    for attempt in range(1, cfg.artifact_retries + 1):
        try:
            return fn()
        except CassError:
            raise
        except Exception as exc:  # any transport or store error: S3, HTTP, filesystem
            message = redact(f"{type(exc).__name__}: {exc}")[:600]
            if attempt == cfg.artifact_retries:
                raise TrackingError(f"{what} failed after {attempt} attempt(s): {message}") from None
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1f s", what, attempt, cfg.artifact_retries,
                        message, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
