"""Data versioning and the DVC pipeline, with the real `dvc`, `git` and `cass` commands in temporary repositories.

One project is built once per test run (tiny settings: 64 images of 32 px, one pretraining epoch) with the
project's own dvc.yaml (built_project); this module and tests/test_dvc_experiments.py each work on a copy, whose
tests then rerun, change and move it. S3 is a real moto_server on loopback.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cass.config import Params, params_from_mapping
from cass.dvc_yaml import Plan
from cass.errors import DataError, VersioningError
from tests.conftest import LENIENT_MODEL_GATE, free_port, tiny_mapping

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dvc_stages(params: Params) -> set[str]:
    """The DVC stages (``name@network`` per network) that dvc.yaml holds for ``params``: those of the pipeline's
    stage list (:data:`cass.pipeline.STAGES`) that the settings run."""
    plan = Plan.of(params)
    per_network = {stage.name for stage in plan.stages() if stage.per_network}
    return {f"{name}@{net}" if name in per_network else name
            for name in plan.names for net in (plan.networks if name in per_network else ("",))}


# The module's project: default networks, CASS pretraining and tuning (tune.enabled defaults to true).
STAGES = dvc_stages(params_from_mapping({}))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org", GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.org", DVC_NO_ANALYTICS="1", PYTHONWARNINGS="ignore",
    )
    return env


# A generous bound: `dvc exp run` retrains tune/finetune/evaluate, minutes on a busy 2-core machine.
COMMAND_TIMEOUT_S = 1800


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def init_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sh("git", "init", "-q", "-b", "main", cwd=path)
    sh("dvc", "init", "-q", cwd=path)
    sh("dvc", "config", "core.analytics", "false", cwd=path)
    return path


def tracked_files(root: Path, *folders: str) -> dict[str, bytes]:
    out = {}
    for folder in folders:
        for f in sorted((root / folder).rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = f.read_bytes()
    return out


def pipeline_outputs(root: Path) -> list[str]:
    """Every output path recorded in dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return sorted(out["path"] for stage in lock["stages"].values() for out in stage.get("outs", []))


def test_every_code_dependency_of_the_pipeline_exists() -> None:
    # Guards: a module renamed or removed while dvc.yaml still lists it fails `dvc repro` at that stage.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = {d for stage in stages.values() for d in stage.get("deps", []) if d.startswith(("cass/", "flows/"))}
    assert deps, "dvc.yaml lists no code dependencies"
    assert sorted(d for d in deps if not (REPO / d).exists()) == []


slow = pytest.mark.slow  # the module's project is built with a real `dvc repro` (about a minute on 2 cores)


def _build_project(root: Path) -> Path:
    """The project's dvc.yaml, code and .gitignore in a fresh git+DVC repository at ``root``, built with
    `dvc repro` and committed."""
    init_repo(root)
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # the offline page template of `dvc plots`
    template = configparser.ConfigParser()
    template.read(REPO / ".dvc" / "config")
    sh("dvc", "config", "plots.html_template", template["plots"]["html_template"], cwd=root)
    shutil.copytree(REPO / "cass", root / "cass", ignore=shutil.ignore_patterns("__pycache__"))
    raw = tiny_mapping(Path("data/demo"))
    raw["data"]["max_image_pixels"] = 89_478_485
    raw["finetune"].update(device="cpu", lr=0.001, focal_gamma=2.0)  # keys docs/dvc.md's example sets with -S
    raw["augment"] = {}
    raw["quality"] = {"min_images_per_class": 5, **LENIENT_MODEL_GATE}  # one-epoch models: the gate only warns
    raw["tune"] = {"n_trials": 2, "epochs": 1, "startup_trials": 1, "pruner": {"type": "none"}, "pin": [],
                   "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                             "batch_size": {"type": "categorical", "choices": [4, 8]}}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh("cass", "data", "demo", "-q", cwd=root)
    sh("cass", "data", "add", "data/demo", "--layout", "imagefolder", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "project with the demo data", cwd=root)
    first = sh("dvc", "repro", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "pipeline run", cwd=root)
    root.joinpath(".git", "first-repro.log").write_text(first.stdout)  # inside .git: not a project file
    return root


def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built once per test run, by whichever xdist worker asks first (the others wait for it under
    a file lock in the folder the workers share): two modules read it, and a `dvc repro` is minutes on a busy
    2-core machine. Never changed after it is built: each module works on a copy (:func:`project`)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-of-<user>/pytest-<n>: the run's folder, above each worker's own
    built = shared / "dvc-project-built" / "repo"
    with open(shared / "dvc-project-built.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (built / ".git" / "first-repro.log").is_file():  # not built yet, or a build that failed half-way
            shutil.rmtree(built.parent, ignore_errors=True)
            _build_project(built)
    return built


def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the built project for one module (git history, DVC cache, workspace and outputs as built)."""
    root = tmp_path_factory.mktemp("dvc-project") / "repo"
    shutil.copytree(built_project(tmp_path_factory), root, symlinks=True)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's copy of the built project."""
    return project_copy(tmp_path_factory)


def restore(project: Path, head: str) -> None:
    """Put the module's project back as it was built: commit, params, lock, workspace data and outputs."""
    sh("git", "reset", "-q", "--hard", head, cwd=project)
    sh("git", "clean", "-q", "-fd", cwd=project)  # untracked, not ignored: e.g. a half-written dvc.lock
    for extra in (project / "data").rglob("extra*.png"):
        extra.unlink()
    sh("dvc", "checkout", "-q", "--force", cwd=project)


@contextlib.contextmanager
def restored(project: Path) -> Iterator[Path]:
    """The module's project for a test that changes it. Whatever the test did, or failed to undo because it
    failed or timed out half-way, the next test gets the project back as built (so one slow step on a busy
    machine cannot fail the tests after it)."""
    head = sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    try:
        yield project
    finally:
        restore(project, head)
    assert "up to date" in sh("dvc", "status", cwd=project).stdout


@pytest.fixture
def shared_project(project: Path) -> Iterator[Path]:
    """The module's project for a test that changes it, put back as built afterwards (:func:`restored`)."""
    with restored(project):
        yield project


# --------------------------------------------------------------------------------------------------
# The pipeline


@slow
def test_restore_undoes_what_an_interrupted_test_leaves_behind(project: Path) -> None:
    # Guards: a `dvc exp run` that hit its time limit on a busy machine left the shared project dirty, and the
    # tests after it failed ("unsaved files", restored bytes differ, status not up to date).
    head = sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("epochs: 1", "epochs: 4"))
    (project / "dvc.lock").write_text((project / "dvc.lock").read_text() + "# half-written\n")
    shutil.copy(project / "data/demo/tumor/tumor_0000.png", project / "data/demo/tumor/extra.png")
    metrics = project / "outputs/evaluate/cnn/metrics.json"
    metrics.unlink()
    metrics.write_text("{}")
    (project / "stray.txt").write_text("left by a killed command")
    sh("git", "commit", "-qam", "a commit made half-way", cwd=project)
    assert "up to date" not in sh("dvc", "status", cwd=project).stdout

    restore(project, head)
    assert sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip() == head
    assert sh("git", "status", "--porcelain", cwd=project).stdout == ""
    assert (project / "params.yaml").read_text() == params and not (project / "stray.txt").exists()
    assert not (project / "data/demo/tumor/extra.png").exists() and json.loads(metrics.read_text())
    assert "up to date" in sh("dvc", "status", cwd=project).stdout


@slow
def test_repro_builds_every_stage_and_records_lineage(project: Path) -> None:
    assert ran_stages((project / ".git" / "first-repro.log").read_text()) == STAGES
    for path in pipeline_outputs(project):
        assert (project / path).exists(), f"dvc.lock lists {path} but it is missing"
    md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    commit = sh("git", "rev-parse", "HEAD~1", cwd=project).stdout.strip()  # the commit the stages ran at
    lineage = {
        "outputs/data/dataset.json": json.loads((project / "outputs/data/dataset.json").read_text()),
        "outputs/pretrain/metrics.json": json.loads((project / "outputs/pretrain/metrics.json").read_text()),
    }
    for net in ("cnn", "vit"):
        for stage in ("finetune", "evaluate"):
            path = f"outputs/{stage}/{net}/lineage.json"
            lineage[path] = json.loads((project / path).read_text())
    for path, doc in lineage.items():
        assert doc["data_version"] == md5, f"{path} does not record the data version of data.dvc"
        assert doc["git_commit"] == commit, f"{path} does not record the commit it was built from"


@slow
def test_git_ignores_exactly_what_dvc_tracks(project: Path) -> None:
    """data/.gitignore (written by DVC) and the project .gitignore keep data and outputs out of git."""
    assert (project / "data" / ".gitignore").read_text().split() == ["/demo"]
    status = sh("git", "status", "--porcelain", "--ignored", cwd=project).stdout
    assert "!! data/demo/" in status and "!! outputs/" in status
    assert not [line for line in status.splitlines() if not line.startswith("!!")], status


@slow
def test_second_repro_reruns_nothing(project: Path) -> None:
    out = sh("dvc", "repro", cwd=project).stdout
    assert ran_stages(out) == set(), out
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=project).stdout


@slow
def test_finetune_setting_reruns_only_what_depends_on_it(shared_project: Path) -> None:
    project = shared_project
    before = {p: (project / p).read_bytes() for p in pipeline_outputs(project) if p.startswith("outputs/pretrain")}
    out = sh("dvc", "exp", "run", "-S", "finetune.epochs=3", cwd=project).stdout
    # tune@* searches around the finetune settings, so it reruns too; prepare, the gates and pretraining do not.
    assert ran_stages(out) == {"tune@cnn", "tune@vit", "finetune@cnn", "finetune@vit", "evaluate@cnn",
                               "evaluate@vit", "model_gate@cnn", "model_gate@vit"}, out
    assert all((project / p).read_bytes() == b for p, b in before.items()), "pretraining outputs changed"
    shown = sh("dvc", "exp", "show", "--json", cwd=project).stdout
    assert '"epochs": 3' in shown and "outputs/evaluate/cnn/scores.json" in shown

    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project).stdout)
    files = next(iter(metrics.values()))["data"]
    for net in ("cnn", "vit"):
        m = files[f"outputs/evaluate/{net}/scores.json"]["data"]
        assert 0.0 <= m["macro_f1"] <= 1.0 and 0.0 <= m["balanced_accuracy"] <= 1.0
    html = project.parent / "plots"
    sh("dvc", "plots", "show", "-o", str(html), cwd=project)
    page = (html / "index.html").read_text()
    assert "val_loss" in page and "confusion_matrix.png" in page
    assert "<script src=" not in page  # Vega inline (.dvc/plots/offline.html): the page renders offline

    # Registering the experiment's model logs what it was trained with, not what params.yaml says now.
    # Guards: the version's run logged finetune.lr of params.yaml while the model was trained with the tuned lr,
    # and was tagged with a clean commit while the model recorded -dirty (params.yaml modified by `exp run -S`).
    store = project.parent / "mlflow-exp"
    sh("cass", "register", "--network", "cnn", "--set", f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db",
       "--set", f"mlflow.artifact_location={store}/mlruns", "--set", "mlflow.model_prefix=cass-exp", cwd=project)
    record = json.loads((project / "outputs/finetune/cnn/lineage.json").read_text())
    tuned_lr = yaml.safe_load((project / "outputs/tune/best_cnn.yaml").read_text())["finetune"]["lr"]
    assert record["git_commit"].endswith("-dirty") and record["settings"]["finetune"]["lr"] == tuned_lr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    (version,) = client.search_model_versions("name = 'cass-exp-cnn'")
    assert version.tags["git_commit"] == record["git_commit"] and version.tags["model_gate"] == "passed"
    run = client.get_run(version.tags["finetune_run_id"])
    assert float(run.data.params["finetune.lr"]) == pytest.approx(tuned_lr) != 0.001  # params.yaml: 0.001
    assert run.data.params["finetune.epochs"] == "3" and run.data.tags["git_commit"] == record["git_commit"]
    assert client.get_metric_history(run.info.run_id, "val_loss") and version.tags["pretraining_run_id"]

    sh("git", "checkout", "-q", "--", "params.yaml", "dvc.lock", cwd=project)
    sh("dvc", "checkout", "-q", "--force", cwd=project)
    assert "up to date" in sh("dvc", "status", cwd=project).stdout


def _metric_values(doc: object) -> list[tuple[str, object]]:
    """Every (file, value) under a "metrics" mapping of `dvc metrics show --json` / `dvc exp show --json`."""
    found: list[tuple[str, object]] = []

    def leaves(path: str, value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                leaves(path, v)
        elif isinstance(value, list):
            for v in value:
                leaves(path, v)
        else:
            found.append((path, value))

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "metrics" and isinstance(value, dict):
                    for path, entry in value.items():
                        leaves(path, entry.get("data", entry) if isinstance(entry, dict) else entry)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return found


def test_pipeline_declares_numeric_headline_metrics_and_gates_each_model() -> None:
    # Guards: `dvc metrics show` / `exp show` mixed strings (commit, architecture) into about 60 metric columns,
    # and dvc.yaml had no model gate, although docs/quality.md says it runs before registration.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = sorted(str(m) for stage in stages.values() for m in stage.get("do", stage).get("metrics", []))
    assert declared == ["outputs/evaluate/${item}/scores.json", "outputs/finetune/${item}/metrics.json"]
    outs = {str(o) for stage in stages.values() for o in stage.get("do", stage).get("outs", [])}
    assert {"outputs/finetune/${item}/lineage.json", "outputs/evaluate/${item}/lineage.json"} <= outs
    gate = stages["model_gate"]
    assert gate["foreach"] == ["cnn", "vit"] and gate["do"]["cmd"] == "cass validate model --network ${item}"
    assert "outputs/evaluate/${item}/metrics.json" in gate["do"]["deps"]


@slow
def test_dvc_metrics_are_numbers_and_each_model_records_its_lineage_apart(project: Path) -> None:
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project).stdout)
    values = _metric_values({"metrics": next(iter(shown.values()))["data"]})  # {revision: {"data": {file: ...}}}
    files = {path for path, _ in values}
    assert files == {f"outputs/{s}/{n}/{f}" for n in ("cnn", "vit")
                     for s, f in (("evaluate", "scores.json"), ("finetune", "metrics.json"))}, files
    assert [(p, v) for p, v in values if isinstance(v, str | bool)] == []
    assert len(values) <= 40, values  # the headline numbers, not every per-class score
    # dvc.lock is committed with the results (as a project using cass does): the baseline row has its metrics.
    table = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    assert _metric_values(table) and not [p for p, v in _metric_values(table) if isinstance(v, str)]
    committed = [row for row in table if row.get("rev") != "workspace"]
    assert committed, table
    for row in committed:  # `!` in the table: no metrics, or an "error" entry, for that revision
        metrics = (row.get("data") or {}).get("metrics")
        assert metrics and '"error"' not in json.dumps(metrics), row
    commit = sh("git", "rev-parse", "HEAD~1", cwd=project).stdout.strip()
    for net in ("cnn", "vit"):
        record = json.loads((project / f"outputs/finetune/{net}/lineage.json").read_text())
        assert record["network"] == net and record["git_commit"] == commit and record["settings"]["seed"] == 7
        assert record["pretraining"]["weights_sha256"] and record["tuning"]["file"].endswith(f"best_{net}.yaml")
        evaluated = json.loads((project / f"outputs/evaluate/{net}/lineage.json").read_text())
        assert evaluated["arch"] == record["arch"] and evaluated["git_commit"] == commit
        assert json.loads((project / f"outputs/quality/model/{net}/result.json").read_text())["success"]


@slow
def test_data_change_marks_every_stage_changed(shared_project: Path) -> None:
    project = shared_project
    extra = project / "data/demo/tumor/extra.png"
    shutil.copy(project / "data/demo/tumor/tumor_0000.png", extra)
    try:
        status = json.loads(sh("dvc", "status", "--json", cwd=project).stdout)
        # Every stage that reads the images; the model gates read only the evaluation they follow, so they
        # show as changed once `dvc repro` has rewritten it.
        readers = {stage for stage in STAGES if not stage.startswith("model_gate@")}
        assert readers | {"data.dvc"} <= set(status), status
    finally:
        extra.unlink()
    assert "up to date" in sh("dvc", "status", cwd=project).stdout


# --------------------------------------------------------------------------------------------------
# Remote: push, pull into a fresh clone, faults


@slow
def test_push_then_pull_into_fresh_clone_restores_identical_files(
    shared_project: Path, s3_bucket: str, tmp_path: Path
) -> None:
    project = shared_project
    # The remote URL is committed; the endpoint and the credentials come from the environment (s3_env).
    sh("cass", "data", "remote", f"s3://{s3_bucket}/cass", cwd=project)
    assert "endpointurl" not in (project / ".dvc/config").read_text()
    out = sh("cass", "data", "push", cwd=project)
    assert "pushed" in out.stdout, out.stdout
    sh("git", "commit", "-qam", "remote", cwd=project)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    assert not (clone / "data/demo").exists()
    sh("cass", "data", "pull", cwd=clone)
    paths = ["data/demo", *pipeline_outputs(project)]
    for path in paths:
        a, b = project / path, clone / path
        if a.is_dir():
            cmp = filecmp.dircmp(a, b)
            assert not (cmp.left_only or cmp.right_only or cmp.diff_files), path
            assert tracked_files(project, path) == tracked_files(clone, path), path
        else:
            assert a.read_bytes() == b.read_bytes(), path
    assert "up to date" in sh("dvc", "status", cwd=clone).stdout


@slow
def test_demo_regenerated_in_a_clone_without_remote_matches_data_dvc(project: Path, tmp_path: Path) -> None:
    """No cache, no remote: the demo data is generated again, byte for byte, so data.dvc still matches."""
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    sh("cass", "data", "demo", "-q", cwd=clone)
    status = json.loads(sh("dvc", "status", "--json", "data.dvc", cwd=clone).stdout)
    assert status == {"data.dvc": [{"changed outs": {"data/demo": "not in cache"}}]}, status  # not "modified"
    sh("dvc", "commit", "--force", "data.dvc", cwd=clone)
    assert (clone / "data.dvc").read_text() == (project / "data.dvc").read_text()
    assert json.loads(sh("dvc", "status", "--json", "data.dvc", cwd=clone).stdout) == {}


def _corrupt(path: Path) -> None:
    """Change a file's bytes but not its size or mtime: what DVC's own change detection cannot see."""
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@slow
def test_corrupted_cache_object_is_detected_refused_and_replaced(shared_project: Path, s3_bucket: str) -> None:
    project = shared_project
    sh("dvc", "remote", "add", "-f", "good", f"s3://{s3_bucket}/cass", cwd=project)
    sh("cass", "data", "push", "-r", "good", "-q", cwd=project)
    image = project / "data/demo/stroma/stroma_0003.png"
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    cache = Path(sh("dvc", "cache", "dir", cwd=project).stdout.strip())
    obj = cache / "files" / "md5" / md5[:2] / md5[2:]
    original = obj.read_bytes()
    _corrupt(obj)

    verify = sh("cass", "data", "verify", cwd=project, check=False)
    assert verify.returncode == 1 and "data/demo/stroma/stroma_0003.png" in verify.stderr, verify.stderr
    push = sh("cass", "data", "push", "-r", "good", cwd=project, check=False)
    assert push.returncode == VersioningError.exit_code and "refusing to push" in push.stderr, push.stderr

    sh("cass", "data", "pull", "-r", "good", cwd=project)
    assert obj.read_bytes() == original
    assert sh("cass", "data", "verify", cwd=project).returncode == 0


def test_no_remote_says_how_to_configure_one(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "repo")
    out = sh("cass", "data", "push", cwd=repo, check=False)
    assert out.returncode == VersioningError.exit_code
    assert "no DVC remote is configured" in out.stderr and "cass data remote s3://" in out.stderr


def test_unreachable_endpoint_is_retried_then_named(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "repo")
    endpoint = f"http://127.0.0.1:{free_port()}"
    sh("cass", "data", "remote", "s3://bucket/cass", "--endpoint-url", endpoint, "--local", cwd=repo)
    assert endpoint not in (repo / ".dvc/config").read_text()  # --local keeps it out of git
    out = sh("cass", "data", "pull", cwd=repo, check=False)
    assert out.returncode == VersioningError.exit_code
    assert f"S3 endpoint {endpoint} is unreachable" in out.stderr and "tried 3 times" in out.stderr
    assert "attempt 2/3" in out.stderr


# --------------------------------------------------------------------------------------------------
# cass data add


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    repo = init_repo(tmp_path / "repo")
    raw = tiny_mapping(Path("data/demo"))
    raw["data"]["classes"] = ["adipose", "lymphocytes", "stroma", "tumor"]
    (repo / "params.yaml").write_text("# settings\n" + yaml.safe_dump(raw, sort_keys=False))
    return repo


def test_add_copies_an_outside_folder_tracks_it_and_points_params_at_it(
    small_repo: Path, demo_root: Path
) -> None:
    out = sh("cass", "data", "add", str(demo_root), "--layout", "imagefolder", "--name", "tissue", cwd=small_repo)
    assert "64 images, 4 classes" in out.stdout
    assert _files(small_repo / "data/tissue") == _files(demo_root)
    doc = yaml.safe_load((small_repo / "data.dvc").read_text())["outs"][0]
    assert doc["path"] == "data/tissue" and doc["md5"].endswith(".dir")
    params = (small_repo / "params.yaml").read_text()
    data = yaml.safe_load(params)["data"]
    assert (data["root"], data["name"], data["layout"]) == ("data/tissue", "tissue", "imagefolder")
    assert "classes" not in data, "the previous dataset's class list must not carry over"
    assert params.startswith("# settings\n")
    assert (small_repo / "data/.gitignore").read_text().split() == ["/tissue"]
    assert sh("dvc", "status", cwd=small_repo).stdout.strip() == "Data and pipelines are up to date."


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_add_rejects_a_folder_without_images_and_changes_nothing(small_repo: Path, tmp_path: Path) -> None:
    empty = tmp_path / "scans"
    (empty / "tumor").mkdir(parents=True)
    (empty / "tumor" / "notes.txt").write_text("no images here")
    params = (small_repo / "params.yaml").read_text()
    out = sh("cass", "data", "add", str(empty), "--layout", "imagefolder", cwd=small_repo, check=False)
    assert out.returncode != 0 and "scans" in out.stderr
    assert not (small_repo / "data").exists() and not (small_repo / "data.dvc").exists()
    assert (small_repo / "params.yaml").read_text() == params


def test_add_outside_a_dvc_repository_says_so(tmp_path: Path, demo_root: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_mapping(demo_root)))
    out = sh("cass", "data", "add", str(demo_root), "--layout", "imagefolder", cwd=tmp_path, check=False)
    assert out.returncode == VersioningError.exit_code
    assert "not inside a DVC repository" in out.stderr and "dvc init" in out.stderr


def _isic_folder(tmp_path: Path, missing: tuple[str, ...] = ()) -> Path:
    """An ISIC-style folder: gt.csv (image, MEL, NV) and img/<id>.jpg, some files left out."""
    from PIL import Image

    src = tmp_path / "isic"
    (src / "img").mkdir(parents=True)
    ids = [f"ISIC_{i:07d}" for i in range(8)]
    for i, image_id in enumerate(ids):
        if image_id not in missing:
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(src / "img" / f"{image_id}.jpg")
    rows = "".join(f"{image_id},{i % 2},{1 - i % 2}\n" for i, image_id in enumerate(ids))
    (src / "gt.csv").write_text("image,MEL,NV\n" + rows)
    return src


def test_add_checks_every_referenced_file_before_copying_or_writing(small_repo: Path, tmp_path: Path) -> None:
    src = _isic_folder(tmp_path, missing=("ISIC_0000003",))
    params = (small_repo / "params.yaml").read_text()
    csv = ["--set", "data.csv.file=gt.csv", "--set", "data.csv.image_dir=img"]
    out = sh("cass", "data", "add", str(src), "--layout", "csv", *csv, cwd=small_repo, check=False)
    assert out.returncode == DataError.exit_code, out.stderr
    assert "row 5 (ISIC_0000003): img/ISIC_0000003.jpg: file not found" in out.stderr
    assert "not added (nothing was copied, tracked or written)" in out.stderr
    assert not (small_repo / "data").exists() and not (small_repo / "data.dvc").exists()
    assert (small_repo / "params.yaml").read_text() == params

    src = _isic_folder(tmp_path / "complete")
    out = sh("cass", "data", "add", str(src), "--layout", "csv", *csv, "--set", "data.csv.extension=.png",
             cwd=small_repo, check=False)
    assert out.returncode == DataError.exit_code
    assert "file not found (8)" in out.stderr and "set data.csv.extension: .jpg" in out.stderr
    assert not (small_repo / "data").exists() and (small_repo / "params.yaml").read_text() == params


def test_add_under_a_new_name_gives_its_models_their_own_names(small_repo: Path, demo_root: Path) -> None:
    from cass.config import load_params

    params_file = small_repo / "params.yaml"
    params_file.write_text(params_file.read_text() + "mlflow:\n  model_prefix: cass-demo  # the demo's models\n")
    sh("cass", "data", "add", str(demo_root), "--layout", "imagefolder", "--name", "autoimmune", cwd=small_repo)
    assert yaml.safe_load(params_file.read_text())["mlflow"]["model_prefix"] == "auto"
    assert load_params(params_file).mlflow.model_prefix == "cass-autoimmune"

    params_file.write_text(params_file.read_text().replace("model_prefix: auto", "model_prefix: skin"))
    out = sh("cass", "data", "add", str(demo_root), "--layout", "imagefolder", "--name", "isic", cwd=small_repo)
    assert load_params(params_file).mlflow.model_prefix == "skin"  # chosen on purpose: kept, with a warning
    assert "set mlflow.model_prefix: auto to name them cass-isic-*" in out.stderr
