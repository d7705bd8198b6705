"""The DVC pipeline's experiments and new data, with the real `dvc`, `git` and `cass` commands: the two slowest
tests on the project of tests/test_dvc.py, in a module of their own so that a second pytest-xdist worker runs them
beside that module (loadscope gives each module to one worker). The module works on its own copy of the project
built once per run (tests/test_dvc.py: built_project); S3 is not needed here.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests import test_dvc
from tests.test_dvc import REPO, ran_stages, sh, slow

# test_dvc's fixtures, bound here so that this module gets its own copy of the built project
project, shared_project = test_dvc.project, test_dvc.shared_project


@slow
def test_docs_experiment_example_trains_with_the_values_it_sets(shared_project: Path) -> None:
    # Guards: `dvc exp run -S finetune.lr=...` used to rerun tuning, whose lr replaced the one set, so the
    # docs' own example trained the same models as before and skipped evaluation.
    project = shared_project
    docs = (REPO / "docs" / "dvc.md").read_text().splitlines()
    example = next(line for line in docs if line.startswith("dvc exp run -S finetune.lr="))
    args = shlex.split(example.split("#")[0])
    assert "-S" in args and any(a.startswith("tune.pin=") for a in args), example

    run = sh(*args, cwd=project)
    assert {"finetune@cnn", "finetune@vit", "evaluate@cnn", "evaluate@vit"} <= ran_stages(run.stdout), run.stdout
    said = run.stdout + run.stderr
    for net in ("cnn", "vit"):
        best = yaml.safe_load((project / "outputs" / "tune" / f"best_{net}.yaml").read_text())
        assert set(best["finetune"]) == {"batch_size"}  # lr pinned: out of the search; focal_gamma is not searched
        assert best["pinned"] == {"finetune.lr": 0.0003}
        assert f"{net}: pinned by tune.pin, not tuned: finetune.lr=0.0003" in said
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["finetune"]["lr"] == 0.0003 and params["finetune"]["focal_gamma"] == 1.0


@slow
def test_new_data_then_repro_register_promote_compares_on_unseen_images(shared_project: Path) -> None:
    # Guards: after new data, `cass promote` refused "not comparable: v2 was tested on test set ..., champion v1
    # on ...": the champion is now scored, beside the challenger, on the images neither trained or validated on.
    import mlflow

    from cass.comparison import SEEN_SPLITS, version_manifest

    project = shared_project
    store = project.parent / "mlflow-new-data"
    tracking = ["--set", f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db", "--set",
                f"mlflow.artifact_location={store}/mlruns", "--set", "mlflow.model_prefix=cass-new"]
    try:
        sh("cass", "register", "--network", "cnn", *tracking, cwd=project)
        assert "first champion" in sh("cass", "promote", "--network", "cnn", *tracking, cwd=project).stdout
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"]["demo_images_per_class"] = 24  # new images arrive; the old files stay byte-identical
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        sh("cass", "data", "demo", "-q", cwd=project)
        ran = ran_stages(sh("dvc", "repro", "model_gate@cnn", cwd=project).stdout)
        assert {"prepare", "finetune@cnn", "evaluate@cnn"} <= ran
        registered = sh("cass", "register", "--network", "cnn", *tracking, cwd=project)
        assert "registered cass-new-cnn version 2" in registered.stdout
        promoted = sh("cass", "promote", "--network", "cnn", *tracking, cwd=project, check=False)
        assert promoted.returncode in (0, 1), promoted.stderr

        client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
        tags = client.get_model_version("cass-new-cnn", "2").tags
        (record,) = [json.loads(v) for k, v in tags.items() if k.startswith("promotion.")]
        compared = record["compared"]
        assert compared["compared_on"] == "shared unseen images" and compared["champion_version"] == "1"
        beats = (compared["candidate"] - compared["champion"] >= compared["margin"]
                 and compared["difference_interval"][0] > 0)
        assert (promoted.returncode == 0) == beats == (record["decision"] == "promoted"), promoted.stdout
        # Both numbers are in what the command says, promoted or refused.
        assert f"{compared['candidate']:.4f} vs champion v1 {compared['champion']:.4f}" in promoted.stdout
        run = client.get_run(compared["shared_evaluation_run_id"])
        assert run.data.metrics["shared_images"] == compared["shared_images"] > 0
        shared = client.download_artifacts(run.info.run_id, "shared_images.csv", str(store))
        import pandas as pd

        shared_rows = pd.read_csv(shared, dtype=str)
        with mlflow_uri(f"sqlite:///{store}/mlflow.db"):
            for version in ("1", "2"):
                manifest = version_manifest(client, "cass-new-cnn", version)
                seen = manifest[manifest["split"].isin(SEEN_SPLITS)]
                assert not set(shared_rows["sha256"]) & set(seen["sha256"])
        # Why it retrained: the report is in the version's evaluation run and its model card.
        report = client.download_artifacts(tags["evaluation_run_id"], "data_change/data_change.md", str(store))
        assert "64 -> 96 images; **32 added, 0 removed, 0 relabelled**" in Path(report).read_text()
    finally:
        sh("git", "checkout", "-q", "--", "params.yaml", cwd=project)
        sh("cass", "data", "demo", "-q", cwd=project)  # back to the committed images (the restore needs them)


@contextlib.contextmanager
def mlflow_uri(uri: str) -> Iterator[None]:
    """The MLflow tracking URI set for the block (the artifact helpers read it)."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
