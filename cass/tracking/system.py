"""System metrics of a training run: CPU, memory, disk and network (and each GPU's use and memory where
NVML finds one), sampled while the run trains and logged as ``system/*`` metrics beside its curves.

MLflow's monitor samples every 10 s by default and logs only after a whole interval, so a fine-tuning of
a few seconds (the demo's, a tuning trial) logged nothing: cass samples every
``mlflow.system_metrics_interval_s`` (2 s), which ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides as
MLflow documents, and logs the samples of the last, unfinished interval when the training ends. The monitor
is a thread that logs into the run by id, so it works in Prefect's task threads and in tuning workers alike.
GPU metrics need ``nvidia-ml-py`` (installed with cass) and a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from cass.config import MlflowConfig
from cass.logs import at_least_warning

log = logging.getLogger(__name__)

PREFIX = "system/"
"""What MLflow puts before every system metric (``system/cpu_utilization_percentage``)."""


@contextlib.contextmanager
def system_metrics(cfg: MlflowConfig, run_id: str) -> Iterator[None]:
    """Sample the machine into ``run_id`` for the block (nothing when ``system_metrics_interval_s`` is 0).

    A monitor that cannot start (no psutil, a store that refuses) is a warning, never a failed training.
    """
    if cfg.system_metrics_interval_s <= 0:
        yield
        return
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with at_least_warning("mlflow.system_metrics"):  # MLflow says "started/stopped monitoring" at INFO every run
            monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.system_metrics_interval_s)
            monitor.start()
    except Exception as exc:  # the training matters more than its CPU curve
        log.warning("system metrics of run %s are not logged: %s", run_id, exc)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            _finish(monitor, cfg.system_metrics_interval_s)


def _finish(monitor: object, interval_s: float) -> None:
    """Stop the monitor and send its last samples, waiting a few intervals at most: its thread asks the store
    for the run's status, and a tracking server that stopped answering must not hold the training's end (the
    stage's own uploads report the outage)."""
    def finish() -> None:
        with contextlib.suppress(Exception):
            monitor.finish()
            # MLflow's loop drops the samples of an interval that the end of training cut short, so a run
            # shorter than one interval logged nothing: publish what was collected since its last log.
            leftover = monitor.aggregate_metrics()
            if leftover:
                monitor.publish_metrics(leftover)
                monitor.mlflow_logger.flush()

    with at_least_warning("mlflow.system_metrics"):
        thread = threading.Thread(target=finish, name="cass-system-metrics-finish", daemon=True)
        thread.start()
        thread.join(timeout=max(5.0, 3 * interval_s))
    if thread.is_alive():
        log.debug("the system metrics monitor did not stop in time; its last samples may be missing")

