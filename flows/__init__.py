"""Prefect flows: thin callers of the stage functions in :mod:`cass` (see ``flows/retrain.py`` and ``prefect.yaml``)."""
