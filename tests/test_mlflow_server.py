"""MLflow in its production shape: a real `mlflow server` process on loopback, its backend store a
database on the local PostgreSQL, its artifacts proxied to an S3 bucket on moto_server. One pipeline run
is logged and registered; the promotion rules, rollback, concurrent promotions, secret scrubbing and an
artifact-store failure are checked against it."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from cass.config import params_from_mapping
from cass.outputs import Layout
from tests.conftest import LENIENT_MODEL_GATE, MLFLOW_S3_SECRET, tiny_mapping

pytestmark = pytest.mark.slow

PREFIX = "cass-srv"
PARAM_SECRET = "pw-in-params-7f3a"
AWS_SECRET = MLFLOW_S3_SECRET  # the server's own S3 secret key


@pytest.fixture(scope="module")
def server(mlflow_postgres_server):
    """The session's server in production shape (conftest): PostgreSQL store, artifacts proxied to S3."""
    return mlflow_postgres_server


@pytest.fixture(scope="module")
def tracked(server, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One pipeline run logged to the server, both networks registered and promoted."""
    import mlflow

    from cass.pipeline import run_pipeline_with_mlflow
    from cass.tracking import reset_client

    root = tmp_path_factory.mktemp("mlflow-server-run")
    mapping = tiny_mapping(demo_root)
    mapping["mlflow"] = {
        # MLFLOW_TRACKING_URI wins; this one only carries a password that must never be logged.
        "tracking_uri": f"http://alice:{PARAM_SECRET}@mlflow.internal:5000",
        "experiment": "cass-server",
        "model_prefix": PREFIX,
        "artifact_retry_delay_s": 0,
    }
    mapping["quality"] = LENIENT_MODEL_GATE
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    params = params_from_mapping(mapping)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.url)
        mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        result = run_pipeline_with_mlflow(params, Layout(root / "outputs"), params_file=params_file, progress=False)
        yield SimpleNamespace(params=params, result=result, client=mlflow.MlflowClient(server.url), server=server,
                              root=root, data=demo_root)
    reset_client()


def _champion(tracked, network: str = "cnn") -> str:
    return str(tracked.client.get_registered_model(f"{PREFIX}-{network}").aliases["champion"])


def _candidate(tracked, delta: float, network: str = "cnn") -> str:
    """A new version of the champion's model whose recorded test macro F1 is the champion's + ``delta``."""
    import mlflow

    from cass import registry
    from cass.tracking import METRICS_ARTIFACT

    client, name = tracked.client, f"{PREFIX}-{network}"
    base = client.get_model_version(name, _champion(tracked, network))
    metrics = registry.version_metrics(client, name, base.version)
    metrics["macro_f1"] = metrics["macro_f1"] + delta
    experiment = client.get_experiment_by_name("cass-server").experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name=f"candidate {delta:+g}") as run:
        mlflow.log_dict(metrics, METRICS_ARTIFACT)
    keep = ("dataset", "label_fraction", "git_commit", "data_version", "test_set", "network")
    tags = {k: base.tags[k] for k in keep} | {"evaluation_run_id": run.info.run_id}
    mv = registry.register(tracked.params, registry.Candidate(network, base.source, metrics, tags), client)
    return str(mv.version)


def test_pipeline_run_on_the_server_with_artifacts_in_s3(tracked) -> None:
    exp = tracked.client.get_experiment_by_name("cass-server")
    runs = {r.data.tags["stage"] + (f"-{r.data.tags['network']}" if r.data.tags["network"] in ("cnn", "vit") else ""): r
            for r in tracked.client.search_runs([exp.experiment_id]) if "stage" in r.data.tags}
    for name in ("pipeline", "pretrain", "finetune-cnn", "evaluate-cnn", "finetune-vit", "evaluate-vit"):
        assert runs[name].info.status == "FINISHED", name
        assert runs[name].data.tags["data_version"] and runs[name].data.tags["git_commit"]
    assert runs["finetune-vit"].data.tags["pretraining_run_id"] == runs["pretrain"].info.run_id
    keys = [o["Key"] for o in tracked.server.s3.list_objects_v2(Bucket=tracked.server.bucket)["Contents"]]
    for expected in ("params.yaml", "curves.png", "confusion_matrix.png", "roc_curves.png", "model.safetensors"):
        assert any(k.endswith(expected) for k in keys), expected
    assert {n: _champion(tracked, n) for n in ("cnn", "vit")} == tracked.result.versions


def test_champion_from_the_server_predicts_on_images(tracked, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.server.url)
    mlflow.set_tracking_uri(tracked.server.url)
    model = mlflow.pyfunc.load_model(f"models:/{PREFIX}-vit@champion")
    images = [p.read_bytes() for p in sorted((tracked.data / "adipose").glob("*.png"))[:4]]
    probs = model.predict(pd.DataFrame({"image": images}))
    assert probs.shape == (4, 4) and probs.sum(axis=1).round(5).eq(1.0).all()


def test_worse_candidate_is_refused_and_the_champion_stays(tracked, monkeypatch) -> None:
    from cass import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.server.url)
    champion = _champion(tracked)
    worse = _candidate(tracked, -0.2)
    result = registry.promote(f"{PREFIX}-cnn", worse, tracked.params, client=tracked.client)
    assert not result.promoted and "does not beat" in result.reason
    assert _champion(tracked) == champion
    assert tracked.client.get_model_version(f"{PREFIX}-cnn", worse).tags["promotion_refused_at"]


def test_better_candidate_is_promoted_with_audit_tags_and_rollback_restores(tracked, monkeypatch) -> None:
    import json

    from cass import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.server.url)
    name, champion = f"{PREFIX}-cnn", _champion(tracked)
    better = _candidate(tracked, 0.2)
    result = registry.promote(name, better, tracked.params, client=tracked.client)
    assert result.promoted and _champion(tracked) == better
    tags = tracked.client.get_model_version(name, better).tags
    compared = json.loads(tags["compared_metrics"])
    assert tags["previous_champion"] == champion and tags["promoted_at"] and "beats" in tags["promotion_reason"]
    assert compared["candidate"] == pytest.approx(compared["champion"] + 0.2)

    registry.rollback(name, tracked.params, reason="drift on site B", client=tracked.client)
    assert _champion(tracked) == champion
    assert tracked.client.get_model_version(name, champion).tags["restore_reason"] == "drift on site B"


def _race(tracked, name: str, versions: tuple[str, str]) -> dict:
    """Promote both versions at the same moment from two threads, each with its own client."""
    import mlflow

    from cass import registry

    barrier, results, errors = threading.Barrier(len(versions)), {}, []

    def promote(version: str) -> None:
        try:
            barrier.wait(timeout=30)
            results[version] = registry.promote(name, version, tracked.params, client=mlflow.MlflowClient())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_two_concurrent_promotions_never_leave_the_alias_on_the_loser(tracked, monkeypatch) -> None:
    import mlflow

    from cass import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.server.url)
    name = f"{PREFIX}-cnn"
    for round_ in range(2):
        winner, loser = _candidate(tracked, 0.10), _candidate(tracked, 0.05)  # both beat the champion
        results = _race(tracked, name, (winner, loser) if round_ == 0 else (loser, winner))
        assert _champion(tracked) == winner, f"round {round_}: alias on {_champion(tracked)}, not {winner}"
        assert results[winner].promoted
        with pytest.raises(mlflow.exceptions.MlflowException):
            tracked.client.get_registered_model(f"{name}{registry.LOCK_SUFFIX}")  # the lock was released


def test_no_secret_reaches_params_tags_descriptions_or_artifacts(tracked) -> None:
    client = tracked.client
    exp = client.get_experiment_by_name("cass-server")
    texts = []
    for run in client.search_runs([exp.experiment_id]):
        texts += [*run.data.params.values(), *run.data.tags.values()]
    for network in ("cnn", "vit"):
        rm = client.get_registered_model(f"{PREFIX}-{network}")
        texts.append(rm.description or "")
        for mv in client.search_model_versions(f"name = '{PREFIX}-{network}'"):
            texts += [mv.description or "", *mv.tags.values()]
    blob = "\n".join(texts)
    assert "mlflow.internal" in blob  # the setting was logged, without its password
    s3 = tracked.server.s3
    for obj in s3.list_objects_v2(Bucket=tracked.server.bucket)["Contents"]:
        blob += s3.get_object(Bucket=tracked.server.bucket, Key=obj["Key"])["Body"].read().decode("latin-1")
    assert PARAM_SECRET not in blob
    assert AWS_SECRET not in blob


def test_s3_artifact_failure_is_retried_then_run_failed_and_champion_untouched(tracked, tmp_path, monkeypatch,
                                                                                 caplog) -> None:
    from cass.pipeline import run_pipeline_with_mlflow
    from cass.tracking import TrackingError

    mapping = tiny_mapping(tracked.data)
    mapping["mlflow"] = {"experiment": "cass-server-broken", "model_prefix": PREFIX, "artifact_retries": 2,
                         "artifact_retry_delay_s": 0, "artifact_location": f"s3://missing-{uuid.uuid4().hex[:8]}/x"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.server.url)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", tracked.server.s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    champions = {n: _champion(tracked, n) for n in ("cnn", "vit")}
    versions = len(tracked.client.search_model_versions(f"name = '{PREFIX}-vit'"))
    with pytest.raises(TrackingError, match="after 2 attempt"):
        run_pipeline_with_mlflow(params_from_mapping(mapping), Layout(tmp_path / "outputs"), progress=False)
    assert any("attempt 1/2" in r.getMessage() for r in caplog.records)
    exp = tracked.client.get_experiment_by_name("cass-server-broken")
    assert [r.info.status for r in tracked.client.search_runs([exp.experiment_id])] == ["FAILED"]
    assert {n: _champion(tracked, n) for n in ("cnn", "vit")} == champions
    assert len(tracked.client.search_model_versions(f"name = '{PREFIX}-vit'")) == versions
