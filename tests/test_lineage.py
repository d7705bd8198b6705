"""`cass register` of models built outside a tracked pipeline (by `dvc repro` or the stage commands): what
it logs comes from the records beside the model, never from the current params.yaml, and the model gate
runs before anything enters the registry. Real commands on a real local MLflow store (SQLite + folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cass.cli import main
from cass.errors import GateFailed, TrainingError
from cass.outputs import EvaluateOutputs, FinetuneOutputs, Layout
from cass.tracking import data_digest
from tests.conftest import LENIENT_MODEL_GATE, tiny_mapping

pytestmark = pytest.mark.slow

PREFIX = "cass-lineage"
TUNED_LR = 0.003  # what `cass tune` found; params.yaml says something else by the time the model is registered
RECORDED_COMMIT = "0123456789abcdef0123456789abcdef01234567-dirty"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, demo_root: Path):
    """Both networks pretrained, fine-tuned (the CNN with a tuned lr) and evaluated by the stage commands,
    as `dvc repro` runs them; nothing logged to MLflow yet."""
    import mlflow

    from cass.tracking import reset_client

    root = tmp_path_factory.mktemp("lineage")
    mapping = tiny_mapping(demo_root)
    mapping["mlflow"] = {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlruns"),
                         "experiment": "cass-lineage", "model_prefix": PREFIX, "artifact_retry_delay_s": 0}
    mapping["quality"] = LENIENT_MODEL_GATE
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    layout = Layout(root / "outputs")
    best = root / "outputs" / "tune" / "best_cnn.yaml"
    best.parent.mkdir(parents=True)
    best.write_text(yaml.safe_dump({"network": "cnn", "study": "cass-finetune-cnn", "trial": 3,
                                    "objective": "val_macro_f1", "finetune": {"lr": TUNED_LR}}))

    def cli(*args: str) -> int:
        return main([*args, "--params", str(params_file), "--outputs", str(layout.root), "-q"])

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for command in (["data", "prepare"], ["pretrain"], ["finetune", "--network", "cnn", "--best-params", str(best)],
                        ["finetune", "--network", "vit"], ["evaluate"]):
            assert cli(*command) == 0, command
        yield SimpleNamespace(root=root, layout=layout, cli=cli, client=mlflow.MlflowClient(mapping["mlflow"][
            "tracking_uri"]))
    reset_client()


def _versions(built, network: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return built.client.search_model_versions(f"name = '{PREFIX}-{network}'")
    except MlflowException:
        return []


def test_registration_logs_the_settings_commit_curves_and_pretraining_the_model_was_trained_with(built) -> None:
    # Guards: after `dvc exp run -S finetune.lr=0.0005 && cass register`, the version's run logged the lr of
    # params.yaml although the model was trained with the tuned lr, was tagged with a clean commit while the
    # model recorded -dirty, had no per-epoch curves and no link to its pretraining run.
    ft = FinetuneOutputs(built.layout.finetune("cnn"))
    record = json.loads(ft.lineage.read_text())
    assert record["settings"]["finetune"]["lr"] == TUNED_LR and record["tuning"]["in_effect"] == ["lr"]
    record["git_commit"] = RECORDED_COMMIT  # as a `dvc exp run` (params.yaml modified) records it
    ft.lineage.write_text(json.dumps(record))

    assert built.cli("register", "--network", "cnn", "--set", "finetune.lr=0.0005",
                     "--set", "finetune.epochs=9") == 0
    mv = max(_versions(built, "cnn"), key=lambda v: int(v.version))
    assert mv.tags["git_commit"] == RECORDED_COMMIT and mv.tags["model_gate"] == "passed"
    assert mv.tags["tuned_params"] == "lr" and mv.tags["tuned_from"].endswith("best_cnn.yaml")
    run = built.client.get_run(mv.tags["finetune_run_id"])
    assert run.data.params["finetune.lr"] == str(TUNED_LR) and run.data.params["finetune.epochs"] == "2"
    assert run.data.tags["git_commit"] == RECORDED_COMMIT
    resolved = yaml.safe_load(Path(built.client.download_artifacts(run.info.run_id, "params.resolved.yaml",
                                                                   str(built.root))).read_text())
    assert resolved["finetune"]["lr"] == TUNED_LR

    epochs = json.loads(ft.metrics.read_text())["epochs_run"]
    curve = built.client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in curve] == list(range(1, epochs + 1))  # the per-epoch curve, from history.csv

    # Named and given its dataset input as a pipeline's runs are (today's settings differ in lr and epochs).
    digest = data_digest(built.layout.data)
    label = rf"demo@{digest[:8]} lf=1 finetune\.epochs=2 finetune\.lr={TUNED_LR} \d\d-\d\d \d\d:\d\d"
    assert re.fullmatch(f"register-cnn {label}", run.info.run_name), run.info.run_name
    pretraining = built.client.get_run(mv.tags["pretraining_run_id"])
    assert re.fullmatch(f"pretrain {label}", pretraining.info.run_name), pretraining.info.run_name
    assert pretraining.info.status == "FINISHED"
    for logged in (run, pretraining):
        inputs = logged.inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("demo", digest)]
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert [m.step for m in built.client.get_metric_history(pretraining.info.run_id, "loss")] == [1]
    assert pretraining.data.tags["pretrain_cnn_sha256"] == record["pretraining"]["weights_sha256"]

    # The ViT, registered next, links to the same pretraining run instead of logging it again.
    assert built.cli("register", "--network", "vit") == 0
    vit = max(_versions(built, "vit"), key=lambda v: int(v.version))
    assert vit.tags["pretraining_run_id"] == mv.tags["pretraining_run_id"]


def test_a_model_that_fails_the_gate_is_not_registered(built, capsys) -> None:
    # Guards: `cass register` ran no gate, so a ViT at macro F1 0.27 entered the registry.
    before = {network: len(_versions(built, network)) for network in ("cnn", "vit")}
    assert built.cli("register", "--set", "quality.min_macro_f1=1.0") == GateFailed.exit_code
    err = capsys.readouterr().err
    assert f"{PREFIX}-cnn: not registered, model gate failed" in err and "macro_f1_floor" in err
    assert {network: len(_versions(built, network)) for network in ("cnn", "vit")} == before


def test_each_network_that_passes_the_gate_is_registered_and_the_failure_names_it(built, capsys) -> None:
    metrics_file = EvaluateOutputs(built.layout.evaluate("vit")).metrics
    original = metrics_file.read_text()
    metrics = json.loads(original)
    floor = json.loads(EvaluateOutputs(built.layout.evaluate("cnn")).metrics.read_text())["macro_f1"] / 2
    metrics_file.write_text(json.dumps({**metrics, "macro_f1": floor / 2}))  # the ViT scores below the floor
    before = {network: len(_versions(built, network)) for network in ("cnn", "vit")}
    try:
        code = built.cli("register", "--set", f"quality.min_macro_f1={floor}")
        err = capsys.readouterr().err
        assert code == GateFailed.exit_code, err
        assert f"{PREFIX}-vit: not registered, model gate failed" in err
        assert f"{PREFIX}-cnn: passed the model gate, registered as version" in err
        assert {n: len(_versions(built, n)) - before[n] for n in ("cnn", "vit")} == {"cnn": 1, "vit": 0}

        assert built.cli("register", "--set", f"quality.min_macro_f1={floor}",
                         "--set", "quality.model_gate_policy=all") == GateFailed.exit_code
        assert "not registered (quality.model_gate_policy: all)" in capsys.readouterr().err
        assert {n: len(_versions(built, n)) - before[n] for n in ("cnn", "vit")} == {"cnn": 1, "vit": 0}
    finally:
        metrics_file.write_text(original)


def test_an_evaluation_of_other_weights_is_refused(built, capsys) -> None:
    lineage = EvaluateOutputs(built.layout.evaluate("cnn")).lineage
    original = lineage.read_text()
    lineage.write_text(json.dumps({**json.loads(original), "model_sha256": "0" * 64}))
    try:
        assert built.cli("register", "--network", "cnn") == TrainingError.exit_code
        assert "rerun `cass evaluate --network cnn`" in capsys.readouterr().err
    finally:
        lineage.write_text(original)
