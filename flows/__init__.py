"""Prefect flows: thin callers of the stage functions in :mod:`cass` (see ``flows/retrain.py`` and ``prefect.yaml``)."""

from cass.telemetry import disable_telemetry

disable_telemetry()  # `python -m flows.retrain` and a worker's flow run: before Prefect and MLflow load
