"""The production stack in infra/, checked without a container engine: every file parses, every service
can start (image or build, command), every variable is documented, the Kubernetes pool asks for GPUs,
the S3 policy stays least-privilege, and the ports agree with docs/production.md."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
JOB_TEMPLATE = INFRA / "k8s-work-pool-base-job-template.json"
POLICY = INFRA / "iam-policy.json"
DOCS = ROOT / "docs" / "production.md"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?+])[^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    out = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{ENV_EXAMPLE}:{n}: not KEY=VALUE: {line!r}"
        assert key not in out, f"{ENV_EXAMPLE}:{n}: {key} listed twice"
        out[key] = value
    return out


def _compose_variables(node: object) -> set[str]:
    """${VAR} references compose interpolates in the file's values ($${VAR} is left to the container's shell)."""
    if isinstance(node, dict):
        return set().union(*(_compose_variables(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_compose_variables(v) for v in node))
    text = str(node)
    return {m.group(1) for m in VARIABLE.finditer(text) if text[max(m.start() - 1, 0)] != "$" or m.start() == 0}


def test_every_file_in_infra_parses() -> None:
    files = sorted(p for p in INFRA.iterdir() if p.is_file())
    assert files, "infra/ is empty"
    for path in files:
        text = path.read_text()
        if path.suffix in (".yml", ".yaml"):
            assert isinstance(yaml.safe_load(text), dict), path
        elif path.suffix == ".json":
            assert isinstance(json.loads(text), dict), path
        elif path.name.endswith("Dockerfile"):
            assert re.search(r"^FROM \S+", text, re.M), f"{path}: no FROM"
        elif path.suffix == ".sh":
            assert text.startswith("#!/bin/sh") and "set -eu" in text, path
            result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
            assert result.returncode == 0, f"{path}: {result.stderr}"


def test_the_stack_has_its_services_each_with_image_and_command(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    assert "version" not in compose  # obsolete in Compose v2
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
        assert svc.get("command"), f"service {name} has no command"
        if "build" in svc:
            context = (INFRA / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), f"service {name}: Dockerfile not found"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"service {name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"service {name} uses undeclared volume {source}"
    for name, svc in services.items():
        if name != "minio-init":
            assert svc.get("restart") == "unless-stopped", f"{name} does not restart"


def test_mlflow_serves_artifacts_from_s3_with_postgres_backend(compose: dict) -> None:
    command = " ".join(compose["services"]["mlflow"]["command"])
    assert "--serve-artifacts" in command
    assert re.search(r"--artifacts-destination=s3://", command)
    assert re.search(r"--backend-store-uri=postgresql://\S+@postgres:5432/mlflow", command)
    dockerfile = (INFRA / "mlflow.Dockerfile").read_text()
    assert "psycopg2" in dockerfile and "boto3" in dockerfile  # the official image lacks both


def test_prefect_server_on_postgres_and_worker_on_cuda_image(compose: dict) -> None:
    services = compose["services"]
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    worker = services["prefect-worker"]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["command"][worker["command"].index("--pool") + 1] == "cass-process"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    gpus = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in gpus)

    dockerfile = (INFRA / "worker.Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M)
    assert base and re.fullmatch(r"pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime", base.group(1)), base
    assert re.search(r"^RUN pip install \. ", dockerfile, re.M), "the project is not installed"
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), f"worker.Dockerfile copies missing {part}"
    ignored = (INFRA / "worker.Dockerfile.dockerignore").read_text().split()
    assert {".env", "infra/.env", ".venv", ".git"} <= set(ignored)  # no secrets or venv in the image


def test_every_variable_the_stack_uses_is_in_env_example_without_secrets(compose: dict) -> None:
    documented = _env_example()
    used = _compose_variables(compose)
    assert used, "no ${VAR} found in the compose file"
    missing = used - set(documented)
    assert not missing, f"used in docker-compose.yml but not listed in infra/.env.example: {sorted(missing)}"
    # What the project itself reads from the environment is listed too (for clients and Kubernetes).
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "CASS_TUNE_STORAGE", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "CASS_CACHE_DIR"):
        assert key in documented, key
    for key, value in documented.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value.startswith("change-me") or value.startswith("${"), f"{key} holds a value, not a placeholder"
    assert not re.search(r"AKIA[0-9A-Z]{16}", ENV_EXAMPLE.read_text())


def test_env_files_with_secrets_are_ignored_by_git() -> None:
    for path in (".env", "infra/.env"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, f"{path} not ignored"
    assert subprocess.run(["git", "check-ignore", "-q", "infra/.env.example"], cwd=ROOT).returncode == 1


def test_kubernetes_job_template_requests_gpus_and_renders() -> None:
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(JOB_TEMPLATE.read_text())
    config, variables = template["job_configuration"], template["variables"]["properties"]
    undefined = {p.name for p in find_placeholders(config)} - set(variables)
    assert not undefined, f"placeholders without a variable: {undefined}"
    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    rendered = apply_values(config, {**defaults, "name": "cass-pretrain", "command": "prefect flow-run execute"})
    manifest = rendered["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"  # the Kubernetes worker requires this container name
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["envFrom"] == [{"secretRef": {"name": "cass-env"}}]  # secrets from a Secret, not the template
    assert rendered["namespace"] == "cass"
    assert variables["gpus"]["minimum"] == 1 and variables["gpus"]["type"] == "integer"


def test_iam_policy_is_limited_to_the_bucket_prefix() -> None:
    policy = json.loads(POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
        for resource in statement["Resource"]:
            assert resource in ("arn:aws:s3:::cass-artifacts", "arn:aws:s3:::cass-artifacts/cass/*"), resource
        if "s3:ListBucket" in actions:
            assert statement["Condition"]["StringLike"]["s3:prefix"] == ["cass/", "cass/*"]
    allowed = {a for s in policy["Statement"] for a in s["Action"]}
    assert not allowed & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy", "s3:PutBucketAcl"}
    env = _env_example()
    assert (env["CASS_S3_BUCKET"], env["CASS_S3_PREFIX"]) == ("cass-artifacts", "cass")


def test_published_ports_match_the_docs(compose: dict) -> None:
    published = set()
    for name, svc in compose["services"].items():
        for mapping in svc.get("ports", []):
            host, container = mapping.split("#")[0].strip().rsplit(":", 2)[-2:]
            assert host == container, f"{name}: host port {host} differs from container port {container}"
            published.add((name, int(host)))
    table = DOCS.read_text().split("## 1. Services and ports", 1)[1].split("\n## ", 1)[0]
    documented = {(m.group(1), int(m.group(2))) for m in re.finditer(r"^\| ([\w-]+) \| (\d+) \|", table, re.M)}
    assert published == documented, f"compose publishes {sorted(published)}, the docs list {sorted(documented)}"
    docs = DOCS.read_text()
    for pool in ("cass-process", "cass-kubernetes"):
        assert pool in docs
    assert "torchrun --standalone --nproc_per_node" in docs and "cass pretrain --nproc" in docs


def test_every_failure_mode_in_the_production_docs_names_a_test_that_exists() -> None:
    # The failure-modes table of docs/production.md promises that each row is backed by a test: a renamed or
    # removed test would leave a row whose promise nothing checks.
    repo = Path(__file__).resolve().parents[1]
    table = (repo / "docs" / "production.md").read_text().split("## 9. Failure modes", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| fault")
            and not line.startswith("| ---")]
    assert len(rows) >= 10, rows
    missing, last = [], None
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", row.split(" | ")[-1])
        assert named, f"row names no test: {row[:80]}"
        for file, test in named:
            last = file or last
            if f"def {test}(" not in (repo / last).read_text():
                missing.append(f"{last}::{test}")
    assert missing == []
