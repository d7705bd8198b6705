"""Where runs go, and talking to that store: the tracking URI, a server check before any training, the
experiment, bounded calls, retried uploads, and the runs a dead server left open.

``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from params.yaml. The demo uses a local
store (``sqlite:///mlflow.db`` + the ``mlruns/`` artifact folder, no server); production points at an
MLflow server (PostgreSQL backend store, S3 artifacts proxied by the server). A server is checked with
a short timeout BEFORE any training starts, so a wrong address fails in seconds, not after hours.

A server that dies later must not hang the run: MLflow's own HTTP client is bounded by the
``mlflow.http_*`` settings (its ``MLFLOW_HTTP_REQUEST_*`` variables, which win when set), a failed call
becomes one :class:`TrackingError` (exit code 6) that says the server stopped answering, and the runs
that could not be ended are written to ``mlflow.open_runs_file`` and ended the next time the server
answers. MLflow's own "View run ... at <url>" lines are switched off: they print the URI as given,
password included (cass prints its own links, redacted).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse, urlunparse

from cass.config import MlflowConfig
from cass.errors import CassError
from cass.io import atomic_write_text
from cass.tracking.redact import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment's kind (training runs, not GenAI traces), as MLflow's experiment header shows and sets it.
It does not choose the page the UI opens on: see :data:`UI_WORKFLOW`."""

UI_WORKFLOW = "workflowType=machine_learning"
"""The query that opens an experiment on its runs table in MLflow 3's UI. Since 3.x the UI takes the view
of an experiment (GenAI overview and traces, or runs and models) from a "workflow type", not from the
experiment's ``mlflow.experimentKind`` tag: the ``workflowType`` query parameter of the page, else the
choice remembered by the browser (the GenAI / Model training switch, localStorage
``mlflow.workflowType_v1``), else ``genai``. A fresh browser therefore lands on the GenAI overview unless
the link carries this query; every link cass prints does (tests/test_reports_offline.py opens one)."""

LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves a local store by default."""


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of an experiment (its runs table) or of one run, for the tracking URI ``uri`` (a local
    store: as ``mlflow ui`` serves it); no password in it."""
    base = redact(uri).rstrip("/") if is_server(uri) else LOCAL_UI
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_WORKFLOW}"


def where_to_browse(uri: str, experiment_id: str | None, mlflow_command: str = "mlflow") -> str:
    """How to look at an experiment: its page on a server; for a local store, the command that serves it and
    then the page."""
    page = ui_url(uri, experiment_id) if experiment_id else (redact(uri) if is_server(uri) else LOCAL_UI)
    if is_server(uri):
        return page
    return f"`{mlflow_command} ui --backend-store-uri {redact(uri)}`, then {page}"


class TrackingError(CassError):
    """The tracking server or the artifact store cannot be used."""

    exit_code = 6


def tracking_uri(cfg: MlflowConfig) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def _health_problem(uri: str, timeout: float) -> str | None:
    """None when the server at ``uri`` answers ``/health`` with 200 within ``timeout`` s, else what went wrong."""
    parsed = urlparse(uri)
    bare = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else ""))
    health = urlunparse(bare._replace(path=bare.path.rstrip("/") + "/health", query="", fragment=""))
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingError` unless the MLflow server at ``uri`` answers ``/health`` in ``timeout`` s.

    Local stores (SQLite, a folder) need no server and pass.
    """
    if not is_server(uri):
        return
    problem = _health_problem(uri, timeout)
    if problem is None:
        return
    raise TrackingError(
        f"the MLflow tracking server {redact(uri)} did not answer within {timeout:g} s ({problem}). Start the "
        "server, or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri (unset both to use the local store "
        "sqlite:///mlflow.db); outputs already on disk are kept."
    )


# --------------------------------------------------------------------------------------------------
# Bounded calls


HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "http_timeout_s",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "http_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "http_backoff_factor",
}
"""MLflow's HTTP client variables and the ``mlflow.*`` setting each takes its value from."""

_applied: dict[str, str] = {}  # the values this process set, told apart from a user's own


def apply_http_settings(cfg: MlflowConfig) -> None:
    """Bound MLflow's HTTP calls by the ``mlflow.http_*`` settings and switch off its run links.

    MLflow reads ``MLFLOW_HTTP_REQUEST_*`` at every request; a variable the user set wins (as
    MLFLOW_TRACKING_URI does). Its "View run ... at <url>" lines print the URI with its password.
    """
    for name, field in HTTP_SETTINGS.items():
        current = os.environ.get(name)
        if current is None or current == _applied.get(name):
            _applied[name] = os.environ[name] = str(getattr(cfg, field))
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def is_tracking_failure(exc: BaseException) -> bool:
    """An error of the tracking store or the way to it: MLflow's own errors and those of its HTTP client."""
    mlflow_errors = sys.modules.get("mlflow.exceptions")  # never imported here: only mlflow raises these
    if mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException):
        return True
    requests_errors = sys.modules.get("requests.exceptions")
    return requests_errors is not None and isinstance(exc, requests_errors.RequestException)


def tracking_error(cfg: MlflowConfig, what: str, exc: BaseException | None = None) -> TrackingError:
    """The one message for a tracking call that failed: a server that stopped answering is named as such."""
    uri = tracking_uri(cfg)
    problem = _health_problem(uri, cfg.server_timeout_s) if is_server(uri) else None
    if problem is not None:
        return TrackingError(
            f"the MLflow tracking server {redact(uri)} stopped answering while {what} ({problem}). The outputs "
            f"written so far stay on disk; the runs left open are recorded in {cfg.open_runs_file} and marked "
            "FAILED the next time cass reaches the server. Start the server (or fix MLFLOW_TRACKING_URI / "
            "mlflow.tracking_uri) and rerun."
        )
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    return TrackingError(f"the MLflow store {redact(uri)} failed {what}: {redact(str(message))[:600]}")


@contextlib.contextmanager
def reaching(cfg: MlflowConfig, what: str) -> Iterator[None]:
    """Turn a tracking failure in the block into one :class:`TrackingError` (``what``: "logging metrics")."""
    try:
        yield
    except CassError:
        raise
    except Exception as exc:
        if not is_tracking_failure(exc):
            raise
        raise tracking_error(cfg, what, exc) from None


def server_answers(cfg: MlflowConfig) -> bool:
    """Whether the tracking store can be reached now (a local store always can); one short request."""
    uri = tracking_uri(cfg)
    return not is_server(uri) or _health_problem(uri, cfg.server_timeout_s) is None


# --------------------------------------------------------------------------------------------------
# Runs a dead server left open


def _read_open_runs(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text())["runs"])
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable (%s); starting a new list of open runs", path, exc)
        return []


def _write_open_runs(path: Path, runs: list[dict]) -> None:
    if runs:
        atomic_write_text(path, json.dumps({"runs": runs}, indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _open_runs_locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside the open-runs file for one read-modify-write: writers
    in other threads and processes (parallel fine-tunes, tuning workers) would otherwise drop each other's
    entries. The file itself is still rewritten atomically, so readers need no lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_open_run(cfg: MlflowConfig, run_id: str, status: str) -> None:
    """Remember that ``run_id`` should end ``status`` but the server could not be told (the URI is stored
    redacted: the file holds no password)."""
    path = Path(cfg.open_runs_file)
    entry = {"tracking_uri": redact(tracking_uri(cfg)), "run_id": run_id, "status": status,
             "since": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        with _open_runs_locked(path):
            _write_open_runs(path, [*(r for r in _read_open_runs(path) if r.get("run_id") != run_id), entry])
    except OSError as exc:  # the error that stopped the run matters more
        log.warning("MLflow run %s stays RUNNING: it could not be marked %s, nor recorded in %s (%s)",
                    run_id, status, path, exc)
        return
    log.warning("MLflow run %s could not be marked %s; recorded in %s, it is marked when the server answers again",
                run_id, status, path)


def close_open_runs(cfg: MlflowConfig) -> None:
    """End the runs :func:`record_open_run` kept for this store, where they are still RUNNING.

    Called when the store has just answered; a run the store no longer has is forgotten, and any other
    failure leaves the list for the next start (it never fails the command).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    path = Path(cfg.open_runs_file)
    uri = redact(tracking_uri(cfg))
    mine = [r for r in _read_open_runs(path) if r.get("tracking_uri") == uri]
    if not mine:
        return
    client, done = mlflow.MlflowClient(), []
    for entry in mine:
        try:
            run = client.get_run(entry["run_id"])
            if run.info.status == "RUNNING":
                client.set_terminated(entry["run_id"], entry["status"])
                log.info("MLflow run %s (%s), left open since %s when the tracking server stopped answering, "
                         "is now %s", entry["run_id"], run.info.run_name, entry.get("since", "?"), entry["status"])
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                log.warning("could not end the MLflow runs left open (%s); trying again at the next start",
                            redact(str(exc))[:300])
                break
        except Exception as exc:  # the server went away again: keep the list
            log.warning("could not end the MLflow runs left open (%s); trying again at the next start",
                        redact(str(exc))[:300])
            break
        done.append(entry)
    if done:  # the entries recorded meanwhile (the calls above take time) stay
        with _open_runs_locked(path):
            _write_open_runs(path, [r for r in _read_open_runs(path) if r not in done])


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
    apply_http_settings(cfg)
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
    close_open_runs(cfg)
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
    with reaching(cfg, f"looking up the experiment '{cfg.experiment}'"):
        experiment = mlflow.MlflowClient().get_experiment_by_name(cfg.experiment)
    return None if experiment is None or experiment.lifecycle_stage == "deleted" else experiment.experiment_id


def latest_run_id(cfg: MlflowConfig, filter_string: str) -> str | None:
    """The newest run of ``mlflow.experiment`` that matches ``filter_string``; None if there is none."""
    import mlflow

    experiment = experiment_id(cfg)
    if experiment is None:
        return None
    with reaching(cfg, "searching the runs"):
        runs = mlflow.MlflowClient().search_runs(
            [experiment], filter_string, order_by=["attributes.start_time DESC"], max_results=1
        )
    return runs[0].info.run_id if runs else None


def with_retries(what: str, fn: Callable[[], T], cfg: MlflowConfig) -> T:
    """Run an upload, retrying with doubling delays; raise :class:`TrackingError` when every attempt failed.

    The retries are for a flaky artifact store: when the tracking server itself stopped answering (MLflow
    already retried the request), waiting longer will not help and the error is raised at once.
    """
    delay = cfg.artifact_retry_delay_s
    for attempt in range(1, cfg.artifact_retries + 1):
        try:
            return fn()
        except CassError:
            raise
        except Exception as exc:  # any transport or store error: S3, HTTP, filesystem
            if not server_answers(cfg):
                raise tracking_error(cfg, what, exc) from None
            message = redact(f"{type(exc).__name__}: {exc}")[:600]
            if attempt == cfg.artifact_retries:
                raise TrackingError(f"{what} failed after {attempt} attempt(s): {message}") from None
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1f s", what, attempt, cfg.artifact_retries,
                        message, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
