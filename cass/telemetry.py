"""Nothing leaves the machine: the usage telemetry of MLflow and Prefect, off unless a user turns it on.

Hospital sites expect a platform to send nothing outside. Both libraries report usage by default (MLflow 3
since 3.2: ``mlflow.telemetry``; Prefect 3: SDK analytics on ``import prefect`` and server analytics on
start) and each decides *when it is imported or started*, from the environment. So every entry point sets
these variables first (``os.environ.setdefault``: a user's explicit choice wins): the ``cass`` CLI before
any handler runs, ``flows/`` before Prefect loads, the pyfunc model when it loads, the test session.
Processes that import the libraries before any cass code (``prefect worker start``, ``mlflow models serve``,
``mlflow server``, ``prefect server start``) need them in their environment: prefect.yaml, infra/ and
docs/production.md set them there.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

NO_TELEMETRY = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # mlflow.telemetry.utils.is_telemetry_disabled
    "DO_NOT_TRACK": "true",  # the common opt-out: MLflow and Prefect's SDK analytics both read it
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # `prefect server start` (and the ephemeral server) reports none
    "GX_ANALYTICS_ENABLED": "false",  # Great Expectations (cass.quality also sets it before GX loads)
}


def disable_telemetry(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn the libraries' usage telemetry off in ``environ`` (this process and the ones it starts), leaving
    alone a variable the user set."""
    for name, value in NO_TELEMETRY.items():
        environ.setdefault(name, value)
