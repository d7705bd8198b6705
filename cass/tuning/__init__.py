"""Stage ``tune``: an Optuna search over fine-tuning settings, from one process to many workers.

    best_params  ``best_<network>.yaml``: written by a study, applied by :func:`tuned_settings` (the one way)
    storage      where a study lives (SQLite per network, PostgreSQL for many machines); a lost database
    study        create or join a study, sample and prune trials, count them toward ``tune.n_trials``
    workers      :func:`run_trials`, the one way trials run: here, or in worker processes
    search       :func:`run_study`: open the study, run its trials, write the best settings

Workers share a study through its storage. The best settings go to ``best_<network>.yaml``, which
``cass finetune --best-params`` applies over ``params.yaml`` (and DVC declares as a dependency). Tuning
logs through a tracker (:mod:`cass.tracker`): the MLflow tracker logs one run per study and one child run per
trial; the no-op tracker logs none, so tuning runs without MLflow. Nothing here imports :mod:`cass.tracking`.
"""

from cass.tuning.best_params import (
    TunedSettings,
    best_params_by_network,
    pinned_values,
    read_best_params,
    trial_params,
    tuned_settings,
    tuning_origin,
)
from cass.tuning.search import run_study, write_best_params
from cass.tuning.storage import STORAGE_ENV, database_url, resolve_storage
from cass.tuning.study import (
    INTERRUPTED_ATTR,
    PARENT_RUN_ATTR,
    RUN_ATTR,
    SETTINGS_ATTR,
    SURPLUS_ATTR,
    StudyProgress,
    study_name,
    study_progress,
)
from cass.tuning.workers import default_worker_index, route_optuna_logging, run_trials

__all__ = [
    "INTERRUPTED_ATTR",
    "PARENT_RUN_ATTR",
    "RUN_ATTR",
    "SETTINGS_ATTR",
    "STORAGE_ENV",
    "SURPLUS_ATTR",
    "StudyProgress",
    "TunedSettings",
    "best_params_by_network",
    "database_url",
    "default_worker_index",
    "pinned_values",
    "read_best_params",
    "resolve_storage",
    "route_optuna_logging",
    "run_study",
    "run_trials",
    "study_name",
    "study_progress",
    "trial_params",
    "tuned_settings",
    "tuning_origin",
    "write_best_params",
]
