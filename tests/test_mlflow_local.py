"""MLflow on the demo's local store (SQLite + artifact folder, no server): a tracked pipeline run with
its lineage, the registry commands, predictions from the champion, and the faults that must fail fast."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from cass.cli import main
from cass.config import params_from_mapping
from cass.data.demo import generate_demo
from cass.errors import DataError
from cass.lineage import git_commit
from cass.outputs import Layout
from tests.conftest import LENIENT_MODEL_GATE, free_port, stop_group, tiny_mapping

pytestmark = pytest.mark.slow

DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
PREFIX = "cass-local"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    """One tracked pipeline run on a local store, with a DVC-tracked copy of the demo data."""
    import mlflow

    from cass.pipeline import run_pipeline_with_mlflow
    from cass.tracking import reset_client

    root = tmp_path_factory.mktemp("mlflow-local")
    data = root / "demo"
    generate_demo(data, images_per_class=16, size=32)
    (root / "demo.dvc").write_text(yaml.safe_dump({"outs": [{"md5": DATA_MD5, "path": "demo"}]}))
    mapping = tiny_mapping(data)
    mapping["mlflow"] = {
        "tracking_uri": f"sqlite:///{root}/mlflow.db",
        "artifact_location": str(root / "mlruns"),
        "experiment": "cass-test",
        "model_prefix": PREFIX,
        "artifact_retry_delay_s": 0,
        # Longer than any of these tiny trainings: their system metrics are the samples of an interval that the
        # end of training cut short, which MLflow alone drops (cass.tracking.system logs them).
        "system_metrics_interval_s": 60,
    }
    mapping["quality"] = LENIENT_MODEL_GATE
    params_file = root / "params.yaml"
    params_file.write_text("# test settings\n" + yaml.safe_dump(mapping))
    params = params_from_mapping(mapping)
    layout = Layout(root / "outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        result = run_pipeline_with_mlflow(params, layout, params_file=params_file, progress=False)
        client = mlflow.MlflowClient(mapping["mlflow"]["tracking_uri"])
        yield SimpleNamespace(root=root, data=data, params=params, params_file=params_file, layout=layout,
                              result=result, client=client, uri=mapping["mlflow"]["tracking_uri"])
    reset_client()


def _cli(local, *args: str) -> int:
    return main([*args, "--params", str(local.params_file), "--outputs", str(local.layout.root), "-q"])


def _stage(run) -> str:
    """A run's stage, with its network where the stage runs per network: "pipeline", "finetune-cnn"."""
    tags = run.data.tags
    return tags["stage"] + (f"-{tags['network']}" if tags["network"] in ("cnn", "vit") else "")


def _runs(local) -> dict[str, object]:
    """The runs of the pipeline run, by stage."""
    exp = local.client.get_experiment_by_name("cass-test")
    runs = local.client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{local.result.run_id}'")
    return {"pipeline": local.client.get_run(local.result.run_id), **{_stage(r): r for r in runs}}


def _champion(local, network: str) -> str:
    return str(local.client.get_registered_model(f"{PREFIX}-{network}").aliases["champion"])


def test_pipeline_run_carries_lineage_params_epoch_metrics_and_artifacts(local) -> None:
    runs = _runs(local)
    parent = runs["pipeline"]
    stages = ["pretrain", "finetune-cnn", "evaluate-cnn", "finetune-vit", "evaluate-vit"]
    assert set(stages) <= set(runs)
    for name in [*stages, "pipeline"]:
        run = runs[name]
        assert run.info.status == "FINISHED", name
        tags = run.data.tags
        # Lineage on every run: a model can be traced back to its code and its exact data.
        assert tags["data_version"] == DATA_MD5, name
        assert tags["git_commit"] == git_commit() and tags["git_commit"], name
        assert tags["dataset"] == "demo" and tags["label_fraction"] == "1", name
        assert tags["network"] in ("cnn", "vit", "cnn+vit"), name
        # Same flat params everywhere, so the compare view lines up.
        assert run.data.params["finetune.epochs"] == "2" and run.data.params["model.cnn"] == "test_resnet", name
        if name != "pipeline":
            assert tags["mlflow.parentRunId"] == parent.info.run_id
    pretrain_id = runs["pretrain"].info.run_id
    for name in ("finetune-cnn", "evaluate-cnn", "finetune-vit", "evaluate-vit"):
        assert runs[name].data.tags["pretraining_run_id"] == pretrain_id

    ft = runs["finetune-cnn"]
    history = local.client.get_metric_history(ft.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]  # per-epoch metrics with step
    assert "best_val_macro_f1" in ft.data.metrics
    assert "test_macro_f1" in runs["evaluate-cnn"].data.metrics
    assert {"cnn_test_macro_f1", "vit_test_macro_f1"} <= set(parent.data.metrics)

    def files(run, path=None):
        return {a.path for a in local.client.list_artifacts(run.info.run_id, path)}

    assert {"curves.png", "history.csv"} <= files(ft)
    assert {"evaluation/confusion_matrix.png", "evaluation/roc_curves.png", "evaluation/metrics.json"} <= files(
        runs["evaluate-cnn"], "evaluation"
    )
    assert {"params.yaml", "params.resolved.yaml", "data_quality"} <= files(parent)
    assert {"data_quality/manifest", "data_quality/splits", "data_quality/model"} <= files(parent, "data_quality")
    logged = local.client.download_artifacts(parent.info.run_id, "params.yaml", str(local.root))
    assert Path(logged).read_text() == local.params_file.read_text()  # the exact file


def test_runs_are_named_apart_with_their_dataset_input_and_test_metrics(local) -> None:
    runs = _runs(local)
    parent = runs["pipeline"]
    # Named by what sets the run apart: the dataset at its version, the label fraction, when it started.
    assert re.fullmatch(r"demo@01234567 lf=1 \d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    stages = ["pretrain", "finetune-cnn", "evaluate-cnn", "finetune-vit", "evaluate-vit"]
    for stage in stages:
        assert runs[stage].info.run_name == f"{stage} {parent.info.run_name}"
    # The prepared dataset is every run's MLflow dataset input (the Dataset column), the DVC md5 its digest.
    for stage in ["pipeline", *stages]:
        inputs = runs[stage].inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("demo", DATA_MD5)], stage
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == (
            "test" if stage.startswith("evaluate") else "training"), stage
        assert json.loads(inputs[0].dataset.profile)["num_rows"] == 64  # one manifest row per image
    # The test scores sit on the fine-tuning runs too, where runs are compared.
    for network in ("cnn", "vit"):
        finetuned, evaluated = runs[f"finetune-{network}"].data.metrics, runs[f"evaluate-{network}"].data.metrics
        for key in ("test_macro_f1", "test_balanced_accuracy", "test_macro_auroc"):
            assert finetuned[key] == evaluated[key], (network, key)
    # MLflow 3's UI opens the experiment on its training runs, not on the GenAI traces view.
    tags = local.client.get_experiment_by_name("cass-test").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_runs_log_system_metrics(local) -> None:
    # Guards: a run's CPU and memory use were not recorded, so a slow or swapping training could not be told apart.
    runs = _runs(local)
    for stage in ("pretrain", "finetune-cnn", "finetune-vit"):
        metrics = runs[stage].data.metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics), stage
        assert metrics["system/system_memory_usage_megabytes"] > 0
    assert not [k for k in runs["evaluate-cnn"].data.metrics if k.startswith("system/")]  # training runs only


def test_an_experiment_made_before_gets_its_kind_and_one_set_by_hand_stays(tmp_path, tiny_params) -> None:
    import mlflow

    from cass.tracking import configure, reset_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    older = client.create_experiment("older", (tmp_path / "a").as_uri())
    chosen = client.create_experiment("chosen", (tmp_path / "b").as_uri(), tags={"mlflow.experimentKind": "no_type"})
    try:
        for name in ("older", "chosen"):
            mlflow_cfg = tiny_params.mlflow.model_copy(update={"tracking_uri": uri, "experiment": name})
            configure(mlflow_cfg)
    finally:
        reset_client()
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "no_type"


def test_run_labels_name_the_data_fraction_changed_settings_and_time(tiny_params) -> None:
    from datetime import datetime

    from cass.tracking.tags import changed_settings, run_label

    def changed(**updates):
        params = tiny_params
        for key, value in updates.items():
            section, name = key.split("__")
            params = params.model_copy(update={section: getattr(params, section).model_copy(update={name: value})})
        return params

    params = changed(finetune__lr=0.0005, finetune__label_fraction=0.25, mlflow__experiment="other",
                     pretrain__num_workers=2, data__workers=3)
    # Where a run goes (MLflow, loader workers) sets no result apart; the label fraction is named on its own.
    assert changed_settings(params, tiny_params) == {"finetune.lr": "0.0005"}
    assert changed_settings(params, None) == {}
    when = datetime(2026, 11, 30, 16, 40)
    assert run_label(params, DATA_MD5, {"finetune.lr": "0.0005"}, when) == \
        "demo@01234567 lf=0.25 finetune.lr=0.0005 11-30 16:40"
    many = {f"finetune.k{i}": str(i) for i in range(5)}
    assert run_label(params, "", many, when) == \
        "demo@untracked lf=0.25 finetune.k0=0 finetune.k1=1 finetune.k2=2 +2 more 11-30 16:40"


def test_both_networks_registered_with_description_and_promoted(local) -> None:
    for network in ("cnn", "vit"):
        name = f"{PREFIX}-{network}"
        version = local.result.versions[network]
        mv = local.client.get_model_version(name, version)
        assert "fine-tuned" in mv.description and "macro F1" in mv.description
        assert "CASS" in local.client.get_registered_model(name).description
        assert mv.tags["data_version"] == DATA_MD5 and mv.tags["test_set"]
        assert _champion(local, network) == version
        assert mv.tags["previous_champion"] == "" and mv.tags["promoted_at"]


def test_champion_loads_without_pickle_and_returns_class_probabilities(local, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local.uri)
    mlflow.set_tracking_uri(local.uri)
    model = mlflow.pyfunc.load_model(f"models:/{PREFIX}-cnn@champion")
    images = [p.read_bytes() for p in sorted((local.data / "tumor").glob("*.png"))[:3]]
    probs = model.predict(pd.DataFrame({"image": images}))
    assert list(probs.columns) == ["adipose", "lymphocytes", "stroma", "tumor"]
    assert probs.shape == (3, 4)
    assert probs.sum(axis=1).round(5).eq(1.0).all()
    # Base64 text decodes to the same bytes: the same batch gives the same probabilities, bit for bit (another
    # batch size may differ in the last float32 bits: tests/test_predict.py bounds that).
    as_text = model.predict(pd.DataFrame({"image": [base64.b64encode(image).decode() for image in images]}))
    assert as_text.equals(probs)
    with pytest.raises(DataError, match="input row 1"):
        model.predict(pd.DataFrame({"image": [images[0], b"not an image"]}))


def test_predict_command_writes_per_image_probabilities(local, tmp_path) -> None:
    images = sorted((local.data / "stroma").glob("*.png"))[:2]
    out = tmp_path / "pred.csv"
    assert _cli(local, "predict", "--model", f"models:/{PREFIX}-vit@champion", *map(str, images),
                "--output", str(out)) == 0
    table = pd.read_csv(out)
    assert table["path"].tolist() == [str(p) for p in images]
    assert list(table.columns) == ["path", "prediction", "adipose", "lymphocytes", "stroma", "tumor", "model_name",
                                   "model_version", "model_uri", "predicted_at"]
    version = local.result.versions["vit"]
    assert (table["model_name"] == f"{PREFIX}-vit").all() and (table["model_version"] == int(version)).all()


def test_champion_serves_with_mlflow_models_serve(local, tmp_path) -> None:
    """`mlflow models serve` (local env manager: no network) answers base64 images with probabilities."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=local.uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [shutil.which("mlflow", path=str(bin_dir)), "models", "serve", "-m", f"models:/{PREFIX}-cnn@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        image = next((local.data / "tumor").glob("*.png")).read_bytes()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        # Bad input: HTTP 400 with the one-line reason, no stack trace.
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(b"not an image").decode()]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        answer = json.loads(refused.value.read())
        assert refused.value.code == 400 and "stack_trace" not in answer, answer
        assert "input row 0: not an image file" in answer["message"] and "Traceback" not in answer["message"]
    finally:
        stop_group(proc)
    assert set(predictions[0]) == {"adipose", "lymphocytes", "stroma", "tumor"}
    assert sum(predictions[0].values()) == pytest.approx(1.0, abs=1e-5)


def test_register_promote_force_and_rollback_commands(local, capsys) -> None:
    name = f"{PREFIX}-cnn"
    champion = _champion(local, "cnn")
    assert _cli(local, "register", "--network", "cnn") == 0
    candidate = str(max(int(v.version) for v in local.client.search_model_versions(f"name = '{name}'")))
    assert candidate != champion
    assert "model_card" in local.client.get_model_version(name, candidate).tags  # registered outside a pipeline

    # Same model, same metrics: it does not beat the champion by the margin, so the champion stays.
    assert _cli(local, "promote", "--network", "cnn", "--version", candidate) == 1
    assert _champion(local, "cnn") == champion
    tags = local.client.get_model_version(name, candidate).tags
    assert "does not beat" in tags["promotion_refused_reason"]
    assert json.loads(tags["compared_metrics"])["metric"] == "macro_f1"

    # The gate is applied before the comparison.
    assert _cli(local, "promote", "--network", "cnn", "--version", candidate,
                "--set", "quality.min_macro_f1=0.999") == 1
    assert "model gate failed" in local.client.get_model_version(name, candidate).tags["promotion_refused_reason"]

    assert _cli(local, "promote", "--network", "cnn", "--version", candidate, "--force") == 2  # no --reason
    assert _cli(local, "promote", "--network", "cnn", "--version", candidate, "--force",
                "--reason", "hotfix for ticket 42") == 0
    assert _champion(local, "cnn") == candidate
    tags = local.client.get_model_version(name, candidate).tags
    assert tags["previous_champion"] == champion and tags["promotion_forced"] == "true"
    assert "hotfix for ticket 42" in tags["promotion_reason"] and tags["promoted_at"]

    assert _cli(local, "rollback", "--network", "cnn", "--reason", "worse on new scans") == 0
    assert _champion(local, "cnn") == champion
    assert local.client.get_model_version(name, champion).tags["restored_from"] == candidate
    assert local.client.get_model_version(name, candidate).tags["rollback_reason"] == "worse on new scans"
    assert "champion v" in capsys.readouterr().out


def test_unreachable_tracking_server_fails_before_any_training(local, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    outputs = tmp_path / "outputs"
    code = main(["demo", "--params", str(local.params_file), "--outputs", str(outputs), "-q",
                 "--set", "mlflow.server_timeout_s=2"])
    assert code == 6
    assert "did not answer" in capsys.readouterr().err
    assert not outputs.exists()  # nothing prepared, nothing trained


def test_artifact_store_failure_is_retried_then_run_failed_and_champion_untouched(local, tmp_path, monkeypatch,
                                                                                   caplog) -> None:
    import mlflow

    from cass.pipeline import run_pipeline_with_mlflow
    from cass.tracking import TrackingError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    mapping = tiny_mapping(local.data)
    mapping["mlflow"] = {"tracking_uri": local.uri, "artifact_location": str(blocker / "mlruns"),
                         "experiment": "cass-test-broken", "model_prefix": PREFIX, "artifact_retries": 2,
                         "artifact_retry_delay_s": 0}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    champions = {n: _champion(local, n) for n in ("cnn", "vit")}
    with pytest.raises(TrackingError, match="after 2 attempt"):
        run_pipeline_with_mlflow(params_from_mapping(mapping), Layout(tmp_path / "outputs"), progress=False)
    assert any("attempt 1/2" in r.getMessage() for r in caplog.records)
    exp = mlflow.MlflowClient(local.uri).get_experiment_by_name("cass-test-broken")
    runs = mlflow.MlflowClient(local.uri).search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert {n: _champion(local, n) for n in ("cnn", "vit")} == champions
    assert not (tmp_path / "outputs" / "pretrain").exists()


def test_secrets_are_redacted_from_params_and_files() -> None:
    from cass.tracking import loggable_params, redact, redact_yaml_text

    assert "hunter2" not in redact("postgresql://bob:hunter2@db:5432/mlflow")
    assert redact("postgresql://bob:hunter2@db:5432/mlflow").startswith("postgresql://bob:***@db")
    assert "abc123" not in redact("https://host/x?token=abc123&a=1")
    text = "mlflow:\n  tracking_uri: http://u:pw-secret@mlflow:5000  # prod\n  api_token: tok-9 # note\n"
    cleaned = redact_yaml_text(text)
    assert "pw-secret" not in cleaned and "tok-9" not in cleaned and "# prod" in cleaned
    params = params_from_mapping({"mlflow": {"tracking_uri": "http://alice:s3cr3t@mlflow:5000"}})
    assert "s3cr3t" not in json.dumps(loggable_params(params))


def test_promotion_gate_is_the_quality_model_suite() -> None:
    from cass.config import params_from_mapping
    from cass.registry import default_gate

    metrics = {"macro_f1": 0.8, "balanced_accuracy": 0.8, "accuracy": 0.8, "macro_auroc": 0.9,
               "per_class": {"a": {"recall": 0.9, "support": 5}, "b": {"recall": 0.0, "support": 5}}}
    verdict = default_gate(params_from_mapping({}))(metrics)
    assert not verdict.passed and "b" in verdict.text()
    lenient = params_from_mapping({"quality": {"severity": {"class_recall_nonzero": "warn"}}})
    assert default_gate(lenient)(metrics).passed
    assert not default_gate(params_from_mapping({"quality": {"min_macro_f1": 0.9}}))(metrics).passed


# --------------------------------------------------------------------------------------------------
# Calibration, explanations and the model card of every registered version (issue 16)


def test_evaluation_run_carries_calibration_explanations_and_class_counts(local) -> None:
    runs = _runs(local)
    for network in ("cnn", "vit"):
        run = runs[f"evaluate-{network}"]
        files = {a.path for a in local.client.list_artifacts(run.info.run_id, "evaluation")}
        assert {f"evaluation/{f}" for f in ("reliability.png", "reliability.csv", "explanations.png",
                                             "class_counts.csv")} <= files, files
        assert {"test_ece", "test_ece_before_scaling", "test_temperature"} <= set(run.data.metrics)


def test_served_champion_returns_the_evaluated_probabilities(local, monkeypatch) -> None:
    """The registered model applies the temperature fitted on validation, exactly as evaluation did."""
    import mlflow

    from cass.data.manifest import read_manifest

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(local.uri)
    _, info = read_manifest(local.layout.data)
    for network in ("cnn", "vit"):
        evaluated = pd.read_csv(local.layout.evaluate(network) / "predictions.csv")
        spec = json.loads((local.layout.finetune(network) / "model.json").read_text())
        assert spec["temperature"] > 0 and spec["temperature"] != 1.0, spec  # fitted, so the check can fail
        model = mlflow.pyfunc.load_model(f"models:/{PREFIX}-{network}@champion")
        images = [(Path(info.root) / p).read_bytes() for p in evaluated["path"]]
        served = model.predict(pd.DataFrame({"image": images}))
        expected = evaluated[[f"p_{c}" for c in info.classes]].to_numpy()
        assert served[list(info.classes)].to_numpy() == pytest.approx(expected, abs=2e-6)


def test_a_version_that_passed_only_under_lowered_thresholds_is_marked_and_promoted_only_by_force(
        local, tmp_path, caplog) -> None:
    # Guards: after `dvc exp run -S quality.min_macro_f1=0.5` a version was tagged model_gate=passed while its card
    # said "model gate FAILED ... 0.6", and promotion judged it by the lowered floor.
    import mlflow

    name = f"{PREFIX}-cnn"
    piped = json.loads(local.client.get_model_version(name, local.result.versions["cnn"]).tags["model_gate_record"])
    assert piped["promotable"] and "as the committed policy" in piped["source"]  # the same thresholds: one verdict
    macro_f1 = json.loads((local.layout.evaluate("cnn") / "metrics.json").read_text())["macro_f1"]
    assert macro_f1 < 1.0  # else the committed floor below would not fail it and the test would prove nothing
    repo = tmp_path / "project"
    repo.mkdir()
    committed = yaml.safe_load(local.params_file.read_text())
    committed["quality"] = {**committed["quality"], "min_macro_f1": 1.0}
    (repo / "params.yaml").write_text(yaml.safe_dump(committed))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "policy"], cwd=repo,
                   check=True)
    shutil.copy(local.params_file, repo / "params.yaml")  # the experiment's lowered floor (0.0), uncommitted

    def cli(*args: str) -> int:
        return main([*args, "--params", str(repo / "params.yaml"), "--outputs", str(local.layout.root), "-q"])

    champion = _champion(local, "cnn")
    with caplog.at_level("INFO", logger="cass.registry"):
        assert cli("register", "--network", "cnn") == 0
    version = str(max(int(v.version) for v in local.client.search_model_versions(f"name = '{name}'")))
    tags = local.client.get_model_version(name, version).tags
    verdict, record = tags["model_gate"], json.loads(tags["model_gate_record"])
    assert verdict.startswith("passed only under lowered thresholds (quality.min_macro_f1 0.0 (policy 1.0))")
    assert record["verdict"] == verdict and record["passed"] and not record["promotable"]
    assert record["thresholds"]["min_macro_f1"] == 0.0 and record["policy"]["thresholds"]["min_macro_f1"] == 1.0
    assert record["policy"]["source"].startswith("params.yaml at commit ")
    assert f"registered {name} version {version}; model gate {verdict}" in caplog.text  # the log says the same
    mlflow.set_tracking_uri(local.uri)
    card_dir = mlflow.artifacts.download_artifacts(artifact_uri=tags["model_card"].rsplit("/", 1)[0],
                                                   dst_path=str(tmp_path / "card"))
    card = (Path(card_dir) / "model_card.md").read_text()
    assert f"Verdict: **{verdict}**" in card and "FAILED" not in card.split("## Model gate")[0]  # and the card
    assert "model gate passed only under lowered thresholds (not promotable)" in card

    assert cli("promote", "--network", "cnn", "--version", version) == 1  # the committed policy decides
    refused = local.client.get_model_version(name, version).tags["promotion_refused_reason"]
    assert "passed only under lowered thresholds" in refused and "--force --reason" in refused
    assert _champion(local, "cnn") == champion
    assert cli("promote", "--network", "cnn", "--version", version, "--force", "--reason", "pilot study") == 0
    tags = local.client.get_model_version(name, version).tags
    assert _champion(local, "cnn") == version and tags["promotion_forced"] == "true"
    assert "would have been refused: model gate passed only under lowered" in tags["promotion_reason"]
    assert cli("rollback", "--network", "cnn", "--reason", "back to the policy's champion") == 0
    assert _champion(local, "cnn") == champion


def test_every_registered_version_has_a_model_card_with_its_lineage(local, tmp_path) -> None:
    import mlflow

    mlflow.set_tracking_uri(local.uri)
    for network in ("cnn", "vit"):
        name = f"{PREFIX}-{network}"
        version = local.result.versions[network]
        mv = local.client.get_model_version(name, version)
        card_uri = mv.tags["model_card"]
        assert card_uri.endswith("model_card/model_card.html")
        assert "**Model card**" in mv.description and "ECE" in mv.description  # the registry page shows it
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=card_uri.rsplit("/", 1)[0],
                                                          dst_path=str(tmp_path / network)))
        card = (folder / "model_card.md").read_text()
        tags = mv.tags
        for value in (f"{name} version {version}", tags["data_version"], tags["test_set"], tags["git_commit"],
                      tags["pretraining_run_id"], tags["evaluation_run_id"], tags["finetune_run_id"],
                      tags["pipeline_run_id"], "| label fraction | 1 |", "| dataset | demo |"):
            assert value in card, f"{value!r} missing from the card of {name} v{version}"
        for section in ("## Data", "## Test metrics", "## Calibration", "## Subgroups", "## Explanations",
                        "## Model gate", "## Intended use", "## Limitations", "pretraining collapse indicator"):
            assert section in card, section
        evaluated = json.loads((local.layout.evaluate(network) / "metrics.json").read_text())
        assert f"{evaluated['ece']:.3f}" in card and f"{evaluated['macro_f1']:.3f}" in card
        page = (folder / "model_card.html").read_text()
        # Readable offline: no script, no stylesheet or image fetched from anywhere, figures embedded.
        assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
        assert page.count('src="data:image/png;base64,') >= 2
        # The promotion decision links to the card.
        assert json.loads(tags["compared_metrics"])["model_card"] == card_uri


def test_explain_command_draws_heat_maps_from_a_registered_model(local, tmp_path) -> None:
    images = sorted((local.data / "adipose").glob("*.png"))[:2]
    out = tmp_path / "maps"
    assert _cli(local, "explain", "--model", f"models:/{PREFIX}-cnn@champion", *map(str, images),
                "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.cnn.png" for p in images)


def _model_folder(local, tmp_path: Path, network: str = "cnn") -> Path:
    """The champion's model folder, downloaded as `mlflow artifacts download` would."""
    import mlflow

    mlflow.set_tracking_uri(local.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{PREFIX}-{network}@champion",
                                                    dst_path=str(tmp_path / "model")))


def test_a_modified_model_folder_is_refused_before_its_code_runs(local, tmp_path, capsys) -> None:
    folder = _model_folder(local, tmp_path)
    image = str(next((local.data / "tumor").glob("*.png")))
    assert _cli(local, "predict", "--model", str(folder), image) == 0  # as logged: it loads
    capsys.readouterr()
    marker = tmp_path / "code-ran"
    script = folder / "cass_classifier.py"
    original = script.read_text()
    script.write_text(original + f"open({str(marker)!r}, 'w').write('ran')\n")
    assert _cli(local, "predict", "--model", str(folder), image) == 10
    err = capsys.readouterr().err
    assert f"{script}: its content differs from the hash recorded" in err and "Traceback" not in err
    assert not marker.exists()  # refused before MLflow ran the script
    script.write_text(original)

    weights = folder / "artifacts" / "classifier" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _cli(local, "predict", "--model", str(folder), image) == 10
    assert f"{weights}: its content differs" in capsys.readouterr().err
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    planted = folder / "code" / "cass" / "sitecustom.py"
    planted.write_text("print('planted')\n")
    assert _cli(local, "predict", "--model", str(folder), image) == 10
    assert f"{planted}: not recorded when the model was logged" in capsys.readouterr().err
    planted.unlink()
    assert _cli(local, "predict", "--model", str(folder), image) == 0


def test_a_registered_model_is_checked_against_the_hashes_the_server_recorded(local, tmp_path, capsys) -> None:
    """Rewriting a file and the MLmodel's hash list together passes the folder's own check, not the
    tracking server's record of the registered version."""
    import mlflow

    from cass.serving import INTEGRITY_KEY, INTEGRITY_TAG, integrity_digest, logged_model_id, verify_model_folder

    mlflow.set_tracking_uri(local.uri)
    version = local.client.get_model_version_by_alias(f"{PREFIX}-cnn", "champion")
    logged = local.client.get_logged_model(logged_model_id(version))
    assert logged.tags[INTEGRITY_TAG]
    store = Path(logged.artifact_location.removeprefix("file://"))
    backup = tmp_path / "backup"
    shutil.copytree(store, backup)
    try:
        spec = store / "artifacts" / "classifier" / "model.json"
        spec.write_text(spec.read_text().replace('"temperature"', '"temperature" ', 1))
        conf = yaml.safe_load((store / "MLmodel").read_text())
        files = conf["metadata"][INTEGRITY_KEY]["files"]
        files["artifacts/classifier/model.json"] = hashlib.sha256(spec.read_bytes()).hexdigest()
        conf["metadata"][INTEGRITY_KEY]["digest"] = integrity_digest(files)
        (store / "MLmodel").write_text(yaml.safe_dump(conf))
        verify_model_folder(store)  # consistent in itself
        image = str(next((local.data / "tumor").glob("*.png")))
        assert _cli(local, "predict", "--model", f"models:/{PREFIX}-cnn@champion", image) == 10
        assert "not the one the tracking server recorded" in capsys.readouterr().err
    finally:
        shutil.rmtree(store)
        shutil.copytree(backup, store)
    assert _cli(local, "predict", "--model", f"models:/{PREFIX}-cnn@champion", image) == 0


def _plant_bytecode(folder: Path, marker: Path) -> Path:
    """A cached serving module that writes ``marker``, compiled so that Python uses it without looking at the
    source (an unchecked hash-based .pyc): what a tampered folder would carry."""
    import importlib.util
    import py_compile

    source = folder / "code" / "cass" / "serving.py"
    evil = folder.parent / "evil_serving.py"
    evil.write_text(source.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    planted = Path(importlib.util.cache_from_source(str(source)))
    py_compile.compile(str(evil), cfile=str(planted), dfile=str(source),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    evil.unlink()
    return planted


def test_a_planted_bytecode_cache_is_refused_in_a_folder_and_in_the_store(local, tmp_path, capsys) -> None:
    import mlflow

    from cass.serving import logged_model_id

    image = str(next((local.data / "tumor").glob("*.png")))
    marker = tmp_path / "bytecode-ran"
    folder = _model_folder(local, tmp_path)
    planted = _plant_bytecode(folder, marker)
    assert _cli(local, "predict", "--model", str(folder), image) == 10
    err = capsys.readouterr().err
    assert f"{planted}: a Python bytecode cache in the model folder" in err and "Traceback" not in err
    assert not marker.exists()
    shutil.rmtree(planted.parent)
    assert _cli(local, "predict", "--model", str(folder), image) == 0
    assert not list(folder.rglob("__pycache__"))  # loading wrote no bytecode into the folder either

    mlflow.set_tracking_uri(local.uri)
    version = local.client.get_model_version_by_alias(f"{PREFIX}-cnn", "champion")
    store = Path(local.client.get_logged_model(logged_model_id(version)).artifact_location.removeprefix("file://"))
    planted = _plant_bytecode(store, marker)
    try:
        assert _cli(local, "predict", "--model", f"models:/{PREFIX}-cnn@champion", image) == 10
        err = capsys.readouterr().err
        assert "code/cass/__pycache__/serving." in err and "a Python bytecode cache" in err, err
        assert not marker.exists()
    finally:
        shutil.rmtree(planted.parent)
    assert _cli(local, "predict", "--model", f"models:/{PREFIX}-cnn@champion", image) == 0


def test_predict_names_the_file_that_is_not_an_image(local, tmp_path, capsys) -> None:
    good = next((local.data / "tumor").glob("*.png"))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert _cli(local, "predict", "--model", f"models:/{PREFIX}-cnn@champion", str(good), str(bad)) == 3
    err = capsys.readouterr().err
    assert f"{bad}: not an image file" in err and "input row" not in err


def test_the_recorded_digest_is_found_for_every_kind_of_models_uri(tmp_path, monkeypatch) -> None:
    """``latest``, a stage, an alias, a version and a logged model's id resolve as MLflow resolves them when
    loading; a URI that names nothing is one DataError that says what to write."""
    import warnings

    import mlflow

    from cass.serving import INTEGRITY_TAG, recorded_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("digests", artifact_location=(tmp_path / "mlruns").as_uri())
    name = "cass-digests-cnn"
    client.create_registered_model(name)
    models = []
    for digest in ("d1", "d2"):
        model = client.create_logged_model(experiment, name="model", tags={INTEGRITY_TAG: digest})
        client.create_model_version(name, f"models:/{model.model_id}", model_id=model.model_id)
        models.append(model)
    client.set_registered_model_alias(name, "champion", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stages are deprecated, not gone
        client.transition_model_version_stage(name, "1", "Production")

    assert recorded_digest(f"models:/{name}/2") == "d2"
    assert recorded_digest(f"models:/{name}/latest") == "d2"
    assert recorded_digest(f"models:/{name}/Production") == "d1"
    assert recorded_digest(f"models:/{name}@champion") == "d1"
    assert recorded_digest(f"models:/{models[0].model_id}") == "d1"
    for missing in (f"models:/{name}/Staging", f"models:/{name}@nobody", f"models:/{name}"):
        with pytest.raises(DataError, match=f"could not look up model {re.escape(missing)}: .*models:/<name>/latest"):
            recorded_digest(missing)
    mlflow.set_tracking_uri(None)


def test_epoch_metrics_the_store_refuses_are_dropped_and_the_later_epochs_logged(tmp_path, monkeypatch,
                                                                                 caplog) -> None:
    import mlflow

    from cass.config import MlflowConfig
    from cass.tracking import reset_client
    from cass.tracking.client import configure
    from cass.tracking.runs import RunLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "mlruns"),
                       experiment="epochs")
    try:
        run = RunLogger.create(cfg, configure(cfg), "epochs", {})
        with caplog.at_level("WARNING", logger="cass.tracking.runs"):
            run.epoch(1, {"val_loss": 1.0, "x" * 300: 0.5})  # a key longer than MLflow takes: refused
            run.epoch(2, {"val_loss": 0.5})
            run.epoch(3, {"val_loss": 0.25})
        history = mlflow.MlflowClient().get_metric_history(run.run_id, "val_loss")
        run.finish()
    finally:
        reset_client()
    assert sorted((m.step, m.value) for m in history) == [(2, 0.5), (3, 0.25)]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "epoch 1 metrics" in refused[0] and run.run_id in refused[0], caplog.text
