"""`cass tune`: search-space validation, pruning, the best-parameters file reaching fine-tuning, MLflow
runs per study and trial, and workers sharing a PostgreSQL study (including one that is killed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from cass.cli import main
from cass.config import load_params, params_from_mapping
from cass.errors import ConfigError
from cass.outputs import best_params_path
from cass.tracking import data_digest
from cass.tracking.tracker import MlflowTracker
from cass.tuning import (
    PARENT_RUN_ATTR,
    RUN_ATTR,
    database_url,
    run_study,
    run_trials,
    study_progress,
    tuned_settings,
)
from tests.conftest import tiny_mapping

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"type": "categorical", "choices": [4, 8]},
}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module (creating its tables takes seconds); tests tell their runs apart
    by the study's parent run."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def one_thread(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch):
    """Tiny networks train fastest on one thread on a shared machine; worker processes inherit it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mapping(demo_root: Path, tmp_path: Path, **tune_settings) -> dict:
    raw = tiny_mapping(demo_root)
    raw["finetune"].update(init="random", epochs=3, patience=3)
    raw["mlflow"] = {"artifact_location": str(tmp_path / "mlruns"), "experiment": "tune-test"}
    raw["tune"] = {"startup_trials": 2, "space": SPACE, **tune_settings}
    return raw


def _study(storage: str, network: str = "cnn") -> optuna.Study:
    return optuna.load_study(study_name=f"cass-finetune-{network}", storage=database_url(storage))


# --------------------------------------------------------------------------------------------------
# Search space


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": {"type": "float", "low": 0.1, "high": 0.001}}, "tune.space.lr: low (0.1) is greater than high"),
        ({"lrate": {"type": "float", "low": 1e-4, "high": 1e-2}}, "tune.space.lrate: 'lrate' is not a finetune"),
        ({"class_weights": {"type": "categorical", "choices": []}}, "tune.space.class_weights: the choice list is"),
        ({"label_fraction": {"type": "float", "low": 0.1, "high": 1.0}}, "finetune.label_fraction cannot be tuned"),
        ({"batch_size": {"type": "float", "low": 4, "high": 16}}, "tune.space.batch_size: finetune.batch_size is a"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "tune.space.lr: a log scale needs low > 0"),
        ({"lr": {"low": 1e-4, "high": 0.1}}, "tune.space.lr: set type: float, int or categorical"),
    ],
)
def test_invalid_search_space_is_rejected_naming_the_key(demo_root: Path, space: dict, message: str) -> None:
    raw = tiny_mapping(demo_root)
    raw["tune"] = {"space": space}
    with pytest.raises(ConfigError, match="tune.space") as exc:
        params_from_mapping(raw, "params.yaml")
    assert message in str(exc.value)


def test_cli_rejects_invalid_space_before_any_trial(
    tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _mapping(demo_root, tmp_path, space={"lr": {"type": "float", "low": 1.0, "high": 0.5}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["tune", "--network", "cnn", "--params", str(path), "--outputs", str(tmp_path / "out")])
    assert code == 2
    assert "tune.space.lr: low (1.0) is greater than high (0.5)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no storage, no study, no trial


def test_best_params_file_is_validated_like_params_yaml(tmp_path: Path, tiny_params) -> None:
    bad = tmp_path / "best_cnn.yaml"
    bad.write_text(yaml.safe_dump({"network": "cnn", "finetune": {"lr": -1.0}}))
    with pytest.raises(ConfigError, match=r"(?s)best_cnn.yaml.*finetune.lr"):
        tuned_settings(tiny_params, bad, "cnn")
    with pytest.raises(ConfigError, match="holds the best settings of the cnn, not of the vit"):
        tuned_settings(tiny_params, bad, "vit")


# --------------------------------------------------------------------------------------------------
# One process, SQLite: pruning, MLflow runs, best parameters into fine-tuning


def test_study_prunes_logs_trials_and_its_best_params_reproduce_in_finetune(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared_dir, out / "data")
    raw = _mapping(demo_root, tmp_path, n_trials=8, objective="val_loss",
                   pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    common = ["--params", str(params_file), "--outputs", str(out), "-q"]

    assert main(["tune", "--network", "cnn", *common]) == 0
    storage = f"sqlite:///{(out / 'tune' / 'optuna_cnn.db').resolve()}"
    study = _study(storage)
    progress = study_progress(study)
    assert progress.finished == 8 and progress.failed == 0
    assert progress.pruned >= 1, "the median pruner stopped no trial"
    assert progress.complete >= 1

    # MLflow: one parent run for the study, one child per trial with its state and per-epoch metrics.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_pruned"] == progress.pruned
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 8
    # Named as the pipeline's runs are, each trial after the values it tries, with the dataset input.
    digest = data_digest(out / "data")
    assert re.fullmatch(rf"tune-cnn demo@{digest[:8]} lf=1 \d\d-\d\d \d\d:\d\d", parent.info.run_name)
    for trial in study.get_trials():
        run = client.get_run(trial.user_attrs[RUN_ATTR])
        assert run.data.tags["trial_state"] == trial.state.name.lower()
        assert run.data.params["finetune.lr"] == str(trial.params["lr"])
        assert run.info.run_name.startswith(f"cnn-trial-{trial.number} demo@{digest[:8]} lf=1 "), run.info.run_name
        assert f" finetune.lr={trial.params['lr']}" in run.info.run_name, run.info.run_name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps == sorted(trial.intermediate_values)  # one point per reported epoch
    for run in (parent, *children):
        assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("demo", digest)]

    # The best-parameters file holds the best trial, and fine-tuning with it reproduces that trial.
    best_file = best_params_path(out / "tune", "cnn")
    best = yaml.safe_load(best_file.read_text())
    assert best["trial"] == study.best_trial.number
    assert best["finetune"] == study.best_params
    assert main(["finetune", "--network", "cnn", "--best-params", str(best_file), *common]) == 0
    metrics = json.loads((out / "finetune" / "cnn" / "metrics.json").read_text())
    assert metrics["best_val_loss"] == pytest.approx(study.best_value, rel=1e-4)
    default_lr = load_params(params_file).finetune.lr
    assert tuned_settings(load_params(params_file), best_file, "cnn").params.finetune.lr == best["finetune"]["lr"]
    assert best["finetune"]["lr"] != default_lr

    # Running again resumes the finished study (no new trial); other settings are refused, naming them.
    assert main(["tune", "--network", "cnn", *common]) == 0
    assert len(_study(storage).get_trials()) == len(study.get_trials())
    assert main(["tune", "--network", "cnn", "--worker", *common]) == 0  # a late worker finds nothing to do
    assert len(_study(storage).get_trials()) == len(study.get_trials())
    capsys.readouterr()
    assert main(["tune", "--network", "cnn", *common, "--set", "finetune.focal_alpha=0.5"]) == 2
    assert "finetune.focal_alpha: 1.0 -> 0.5" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Workers sharing a PostgreSQL study


class WaitForPeer:
    """Epoch callback: hold each worker's first trial until another worker has started one, so that
    both workers take part however long their start-up takes."""

    def __init__(self, storage: str, study: str, timeout: float = 120.0) -> None:
        self.storage, self.study, self.timeout, self.done = storage, study, timeout, False

    def __call__(self, epoch: int, metrics: dict) -> None:
        if self.done:
            return
        study = optuna.load_study(study_name=self.study, storage=database_url(self.storage))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            workers = {t.user_attrs.get("worker") for t in study.get_trials(deepcopy=False)} - {None}
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        self.done = True


class Hang:
    """Epoch callback: stop the worker mid-trial (after the first epoch was reported) until it is killed."""

    def __call__(self, epoch: int, metrics: dict) -> None:
        time.sleep(3600)


@pytest.mark.slow  # two spawned worker processes import torch: 24 s on a lightly loaded 2-core machine
def test_two_workers_share_a_postgres_study(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, postgres_url: str
) -> None:
    params = params_from_mapping(_mapping(demo_root, tmp_path, n_trials=4, pruner={"type": "none"}))
    peer = WaitForPeer(postgres_url, "cass-finetune-cnn")
    best_file = run_study(params, prepared_dir, "cnn", tmp_path / "tune", workers=2, storage=postgres_url,
                          callbacks=[peer], tracker=MlflowTracker())

    study = _study(postgres_url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4 == study_progress(study).finished
    assert len({t.number for t in complete}) == 4
    assert len({t.user_attrs["worker"] for t in complete}) == 2, "one worker ran every trial"
    assert yaml.safe_load(best_file.read_text())["trial"] == study.best_trial.number


def test_killed_worker_trial_is_failed_requeued_and_the_study_completes(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, postgres_url: str
) -> None:
    params = params_from_mapping(
        _mapping(demo_root, tmp_path, n_trials=3, pruner={"type": "none"}, heartbeat_interval=1, grace_period=3)
    )
    out = tmp_path / "tune"
    ctx = multiprocessing.get_context("spawn")
    doomed = ctx.Process(target=run_trials, args=(params, prepared_dir, "cnn", out, None),
                         kwargs={"storage": postgres_url, "callbacks": [Hang()], "tracker": MlflowTracker()})
    doomed.start()
    try:
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and doomed.is_alive():
            time.sleep(0.2)
            try:
                trials = _study(postgres_url).get_trials(states=(TrialState.RUNNING,))
            except KeyError:  # the study is not created yet
                continue
            victim = next((t for t in trials if t.intermediate_values), None)
        assert victim is not None, "the first worker never reported an epoch"
        os.kill(doomed.pid, signal.SIGKILL)
    finally:
        doomed.join(timeout=30)
    assert doomed.exitcode == -signal.SIGKILL

    best_file = run_study(params, prepared_dir, "cnn", out, storage=postgres_url, tracker=MlflowTracker())

    study = _study(postgres_url)
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert study_progress(study).complete == 3
    assert best_file.is_file()
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(killed.user_attrs[RUN_ATTR])
    assert run.info.status == "FAILED" and run.data.tags["trial_state"] == "failed"


# --------------------------------------------------------------------------------------------------
# Pinned settings: an explicit value is neither searched nor replaced by a tuned one


def test_pin_takes_tunable_finetune_keys_only(demo_root: Path) -> None:
    raw = tiny_mapping(demo_root)
    raw["tune"] = {"pin": ["lr", "finetune.focal_gamma", "finetune.lr"]}
    assert params_from_mapping(raw).tune.pin == ("finetune.lr", "finetune.focal_gamma")
    wrong_keys = (("finetune.lrr", "did you mean 'lr'?"), ("finetune.epochs", "Tunable (as finetune.<key>): lr,"))
    for wrong, message in wrong_keys:
        raw["tune"] = {"pin": [wrong]}
        with pytest.raises(ConfigError, match=f"tune.pin: '{wrong}' is not a tunable finetune setting") as exc:
            params_from_mapping(raw, "params.yaml")
        assert message in str(exc.value)


def test_pinned_key_keeps_its_value_over_a_best_params_file(
    tmp_path: Path, demo_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    best = tmp_path / "best_cnn.yaml"
    best.write_text(yaml.safe_dump({"network": "cnn", "study": "s-cnn", "trial": 3,
                                    "finetune": {"lr": 0.05, "batch_size": 4}}))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_mapping(demo_root, tmp_path)))

    # Unpinned, the file wins (what a tuning is for), and the log says which values it replaced.
    caplog.set_level("INFO", logger="cass.tuning")
    unpinned = tuned_settings(load_params(params_file), best, "cnn")
    assert (unpinned.params.finetune.lr, unpinned.params.finetune.batch_size) == (0.05, 4)
    assert "cnn: tuned settings from" in caplog.text and "finetune.lr=0.05 (was 0.0003)" in caplog.text

    # `--set finetune.lr=...` of a searched key pins it: the file's lr is not used, its batch_size is.
    caplog.clear()
    explicit = load_params(params_file, ["finetune.lr=0.002"])
    assert explicit.tune.pin == ("finetune.lr",)
    tuned = tuned_settings(explicit, best, "cnn")
    assert (tuned.params.finetune.lr, tuned.params.finetune.batch_size) == (0.002, 4)
    assert tuned.tags() == {"tuned_from": f"{best} (trial 3 of study s-cnn)", "tuned_keys": "finetune.batch_size",
                            "pinned_keys": "finetune.lr"}
    assert "pinned by tune.pin, not tuned: finetune.lr=0.002" in caplog.text
    assert tuned_settings(explicit, best, "cnn").params == tuned.params
    # A file from a study that pinned lr carries that value: its best trial ran with it.
    caplog.clear()
    best.write_text(yaml.safe_dump({"network": "cnn", "study": "s-cnn", "trial": 3, "finetune": {"batch_size": 4},
                                    "pinned": {"finetune.lr": 0.002}}))
    carried = tuned_settings(load_params(params_file), best, "cnn")
    assert (carried.params.finetune.lr, carried.params.finetune.batch_size) == (0.002, 4)
    assert carried.pinned == {"lr": 0.002} and "pinned in the study, not tuned: finetune.lr=0.002" in caplog.text
    # A key outside tune.space is not pinned by --set (there is nothing to search), nor is another section.
    assert load_params(params_file, ["finetune.patience=5", "pretrain.lr=0.01"]).tune.pin == ()


def test_explicit_setting_is_not_searched_and_reaches_fine_tuning(
    tmp_path: Path, demo_root: Path, prepared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared_dir, out / "data")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_mapping(demo_root, tmp_path, n_trials=2, epochs=1,
                                                   pruner={"type": "none"})))
    common = ["--params", str(params_file), "--outputs", str(out), "--set", "finetune.lr=0.0005"]

    caplog.set_level("INFO")
    assert main(["tune", "--network", "cnn", *common]) == 0
    study = _study(f"sqlite:///{(out / 'tune' / 'optuna_cnn.db').resolve()}")
    assert len(study.trials) == 2
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for trial in study.trials:
        assert set(trial.params) == {"batch_size"}  # lr is not searched ...
        assert client.get_run(trial.user_attrs[RUN_ATTR]).data.params["finetune.lr"] == "0.0005"  # ... it is set
    assert "pinned: finetune.lr=0.0005" in caplog.text
    best_file = best_params_path(out / "tune", "cnn")
    best = yaml.safe_load(best_file.read_text())
    assert set(best["finetune"]) == {"batch_size"} and best["pinned"] == {"finetune.lr": 0.0005}

    caplog.clear()
    assert main(["finetune", "--network", "cnn", "--best-params", str(best_file), *common, "-q"]) == 0
    assert f"finetune.batch_size={best['finetune']['batch_size']!r}" in caplog.text
    assert "pinned by tune.pin, not tuned: finetune.lr=0.0005" in caplog.text

    # Every searched key pinned: nothing to search, no study; the file changes no setting.
    assert main(["tune", "--network", "vit", *common, "--set", "finetune.batch_size=4"]) == 0
    assert not (out / "tune" / "optuna_vit.db").exists()
    empty = yaml.safe_load(best_params_path(out / "tune", "vit").read_text())
    assert empty["finetune"] == {} and empty["pinned"] == {"finetune.lr": 0.0005, "finetune.batch_size": 4}


def test_tracked_fine_tune_run_tags_the_tuned_and_pinned_keys(
    tmp_path: Path, demo_root: Path, prepared_dir: Path
) -> None:
    from cass.outputs import Layout
    from cass.pipeline import PipelineRun, _finetune
    from cass.tracking import configure

    layout = Layout(tmp_path / "out")
    shutil.copytree(prepared_dir, layout.data)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_mapping(demo_root, tmp_path)))
    params = load_params(params_file, ["finetune.lr=0.002"])
    best = tmp_path / "best_cnn.yaml"
    best.write_text(yaml.safe_dump({"network": "cnn", "study": "s-cnn", "trial": 1,
                                    "finetune": {"lr": 0.05, "batch_size": 4}}))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.create_run(configure(params.mlflow)).info.run_id

    run = PipelineRun(params, layout, tracked=True, run_id=parent, best_params={"cnn": str(best)}, progress=False)
    finetuned = _finetune(run, "cnn")

    logged = client.get_run(finetuned.run_id).data
    assert logged.tags["tuned_keys"] == "finetune.batch_size"
    assert logged.tags["pinned_keys"] == "finetune.lr"
    assert logged.tags["tuned_from"] == f"{best} (trial 1 of study s-cnn)"
    assert (logged.params["finetune.lr"], logged.params["finetune.batch_size"]) == ("0.002", "4")


def test_a_workers_error_reaches_the_parent_with_its_own_class_and_exit_code(tmp_path: Path, demo_root: Path) -> None:
    """A worker's error is rebuilt by its class, not by its exit code: ExplainError shares TrainingError's
    code 4, and an error class the parent cannot find keeps its worker's exit code."""
    import cass.explain  # noqa: F401 - defines ExplainError, exit code 4 as well
    from cass.data.images import ImageError
    from cass.errors import CassError, DataError, TrainingError
    from cass.tracking.client import TrackingError
    from cass.tuning.workers import _after_workers, _WorkerError

    class ElsewhereError(CassError):  # a class the parent cannot import by name
        exit_code = 42

    mapping = tiny_mapping(demo_root)
    mapping["tune"] = {"space": SPACE, "n_trials": 2}
    params = params_from_mapping(mapping)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"  # no study in it: the study is unfinished
    image = ImageError("scan.png", "truncated", "corrupt")  # made from more than a message
    for exc, kind in ((TrainingError("loss diverged"), TrainingError), (TrackingError("server gone"), TrackingError),
                      (image, DataError), (ElsewhereError("from elsewhere"), CassError)):
        with pytest.raises(CassError) as caught:
            _after_workers(params, "cnn", url, ["tune-cnn-0: exit code"], [_WorkerError.of(exc)], 2)
        assert type(caught.value) is kind
        assert str(caught.value) == str(exc) and caught.value.exit_code == exc.exit_code


def test_a_tuning_worker_process_redacts_credentials_in_its_log(tmp_path: Path, demo_root: Path, caplog) -> None:
    """A worker process starts with Python's own log records; it installs the redaction as the CLI does."""
    import logging

    from cass.tuning.workers import _worker_process

    mapping = tiny_mapping(demo_root)
    mapping["tune"] = {"space": SPACE, "pin": list(SPACE)}  # nothing to search: the worker returns at once
    params = params_from_mapping(mapping)
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)  # as in a new process
    try:
        args = (params, demo_root, "cnn", tmp_path, None, f"sqlite:///{tmp_path / 'optuna.db'}")
        _worker_process(args, logging.INFO, 1, multiprocessing.get_context("spawn").SimpleQueue())
        with caplog.at_level(logging.INFO):
            logging.getLogger("cass.tuning").info("storage %s", "postgresql://optuna:s3cret-pw@db:5432/optuna")
    finally:
        logging.setLogRecordFactory(factory)
    assert "postgresql://optuna:***@db:5432/optuna" in caplog.text and "s3cret-pw" not in caplog.text
