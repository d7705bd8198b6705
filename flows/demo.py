"""`cass demo`: the retraining flow (flows/retrain.py) run in this process, and where to look at its result.

Without ``PREFECT_API_URL`` the flow runs against a temporary local Prefect server that Prefect starts in a
subprocess, with its database kept in ``.prefect/`` (``PREFECT_HOME``) so the runs can be browsed later.
Prefect gives that server 20 s to answer by default; with the cores busy (training, tests, other jobs)
its start-up takes longer, and the demo failed with "Timed out while attempting to connect to ephemeral
Prefect API server". The demo therefore waits :data:`STARTUP_TIMEOUT_S` unless the user set
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, and says what to do if the server never answers.

Prefect reads its settings from the environment when it is imported: :func:`prefect_environment` runs
first, and this module imports prefect (through flows.retrain) only inside :func:`run_demo`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cass.errors import CassError
from cass.telemetry import disable_telemetry

if TYPE_CHECKING:
    from cass.config import Params
    from cass.outputs import Layout

STARTUP_TIMEOUT_S = 600
"""Seconds the demo waits for its temporary Prefect server (Prefect's own default is 20)."""
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_STARTUP_FAILED = "ephemeral Prefect API server"  # in the RuntimeError Prefect raises when its server never answers


def prefect_environment(quiet: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Settings of a local Prefect run, each left alone where the user set it: without PREFECT_API_URL a
    temporary server whose database stays in .prefect/ (`PREFECT_HOME=.prefect prefect server start` shows
    the runs afterwards) and that may take STARTUP_TIMEOUT_S to come up; library logs in the flow run's log;
    no usage analytics."""
    if not environ.get("PREFECT_API_URL"):
        environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
        environ.setdefault(STARTUP_TIMEOUT_SETTING, str(STARTUP_TIMEOUT_S))
    disable_telemetry(environ)
    environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cass")
    if quiet:
        environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def demo_console(record: logging.LogRecord) -> bool:
    """The console of `cass demo`: stage lines and the library's messages, without Prefect's HTTP requests and
    task bookkeeping; a failure is printed once, by the CLI, instead of once per task, flow and state."""
    if record.name.startswith(("httpx", "httpcore")):
        return record.levelno >= logging.WARNING
    if record.name == "prefect.task_runs":
        return logging.WARNING <= record.levelno < logging.ERROR
    if record.name == "prefect.flow_runs":
        return record.levelno < logging.ERROR
    return True


def _beside_python(command: str) -> str:
    """``command`` from this interpreter's environment, relative when it lies under the working directory."""
    path = Path(sys.executable).parent / command
    if not path.is_file():
        return command
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class DemoRun:
    """What one `cass demo` did (the flow's result) and where to look at it."""

    result: Mapping[str, Any]
    """The flow's return value: outcome, run_id, metrics, pretraining, promotions or champions."""
    where_to_look: tuple[str, ...]
    """The MLflow and Prefect lines: which runs, and the command or address of each UI."""

    @property
    def unchanged(self) -> bool:
        """Nothing changed since a completed run, so nothing was trained."""
        return self.result["outcome"] == "unchanged"

    def model_lines(self) -> list[str]:
        """Each network's champion (nothing trained) or its registration and promotion decision."""
        if self.unchanged:
            champions = self.result["champions"]
            return [f"{network}: champion {champion or 'none'}" for network, champion in champions.items()]
        return [promotion["summary"] for promotion in self.result["promotions"].values()]


def run_demo(params: Params, layout: Layout, *, params_file: str, overrides: Sequence[str], tune_trials: int,
             force: bool, quiet: bool) -> DemoRun:
    """Run the retraining flow in this process and return its result with where to look at it.

    Raises CassError when the temporary Prefect server does not come up, and the flow's own error when a
    stage fails."""
    from cass.tracking import configure, experiment_id, tracking_uri, where_to_browse

    configure(params.mlflow)  # a tracking server that does not answer fails here, before Prefect starts
    prefect_environment(quiet)
    for handler in logging.getLogger().handlers:
        handler.addFilter(demo_console)
    from flows.retrain import retrain

    try:
        state = retrain(params_file=params_file, overrides=list(overrides), tune_trials=tune_trials,
                        outputs=str(layout.root), force=force, return_state=True)
    except RuntimeError as exc:
        if _STARTUP_FAILED not in str(exc):
            raise
        raise CassError(_server_did_not_start(exc)) from exc
    result = state.result()  # raises the error that failed the run
    flow_run_id = state.state_details.flow_run_id

    browse = where_to_browse(tracking_uri(params.mlflow), experiment_id(params.mlflow), _beside_python("mlflow"))
    mlflow = f"\nMLflow: pipeline run {result['run_id']} in experiment '{params.mlflow.experiment}'; UI: {browse}"
    api = os.environ.get("PREFECT_API_URL")
    if api:
        prefect = (f"Prefect: flow run {flow_run_id}; UI: {api.removesuffix('/').removesuffix('/api')}/runs/flow-run/"
                   f"{flow_run_id}")
    else:
        home = os.path.relpath(os.environ["PREFECT_HOME"])
        prefect = (f"Prefect: flow run {flow_run_id}, kept in {home}/; open the UI: PREFECT_HOME={home} "
                   f"{_beside_python('prefect')} server start, then http://127.0.0.1:4200/runs/flow-run/{flow_run_id}")
    return DemoRun(result=result, where_to_look=(mlflow, prefect))


def _server_did_not_start(exc: RuntimeError) -> str:
    """What to do when the temporary Prefect server never answered (or exited)."""
    waited = os.environ.get(STARTUP_TIMEOUT_SETTING, str(STARTUP_TIMEOUT_S))
    home = os.path.relpath(os.environ.get("PREFECT_HOME", ".prefect"))
    return (
        f"the temporary local Prefect server did not answer within {waited} s ({STARTUP_TIMEOUT_SETTING}). "
        f"Rerun when the machine is less busy or with a larger {STARTUP_TIMEOUT_SETTING}, or start a server "
        f"yourself (PREFECT_HOME={home} {_beside_python('prefect')} server start) and set "
        f"PREFECT_API_URL=http://127.0.0.1:4200/api. Prefect said: {exc}"
    )
