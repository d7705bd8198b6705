"""Nothing leaves the machine: `cass demo` (the Prefect flow with its temporary Prefect server, MLflow tracking
and registry, training, promotion) run with every socket connection and name lookup of every Python process
recorded by an audit hook, in an environment stripped of the variables that would silence the libraries'
telemetry for other reasons (pytest's, CI's, ours): what cass sets by itself must be enough."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LENIENT_MODEL_GATE, tiny_mapping

from cass.telemetry import NO_TELEMETRY, disable_telemetry

ROOT = Path(__file__).resolve().parents[1]

# Loaded by every Python process started with this folder first on PYTHONPATH (the CLI, Prefect's server).
RECORDER = '''
import json, os, socket, sys

_LOG = os.environ["CASS_CONNECTIONS_LOG"]


def _record(kind, host, port):
    with open(_LOG, "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "kind": kind, "host": str(host), "port": str(port),
                             "argv": " ".join(sys.argv[:3])}) + "\\n")


def _hook(event, args):
    if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        _record("connect", args[1][0], args[1][1])
    elif event == "socket.getaddrinfo":
        _record("lookup", args[0], args[1])


sys.addaudithook(_hook)
'''
# What silences telemetry besides cass: pytest's own marker, CI markers, and the opt-outs themselves.
STRIPPED = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "CIRCLECI",
            "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "TEAMCITY_VERSION",
            *NO_TELEMETRY)
LOOPBACK = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "None", ""}


@pytest.mark.slow  # the whole demo flow: about 3 minutes on a busy 2-core machine
def test_the_demo_flow_connects_to_nothing_beyond_loopback(demo_root: Path, tmp_path: Path) -> None:
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(RECORDER)
    log = tmp_path / "connections.jsonl"
    mapping = tiny_mapping(demo_root)
    mapping["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cass-outbound",
                         "artifact_location": str(tmp_path / "mlruns"), "model_prefix": "cass-outbound"}
    mapping["quality"] = LENIENT_MODEL_GATE
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(mapping))
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED and not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PYTHONPATH=f"{recorder}{os.pathsep}{ROOT}", CASS_CONNECTIONS_LOG=str(log))
    proc = subprocess.run([sys.executable, "-m", "cass", "demo", "--params", str(params), "--outputs",
                           str(tmp_path / "outputs"), "-q"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    events = [json.loads(line) for line in log.read_text().splitlines()]
    own_names = {socket.gethostname(), socket.getfqdn()}
    outside = [e for e in events if e["host"] not in LOOPBACK | own_names and not e["host"].startswith("127.")]
    assert not outside, outside[:10]
    # The recorder saw the flow's traffic (the Prefect client talking to its server), so an empty list above
    # means nothing went out, not that nothing was recorded.
    assert any(e["kind"] == "connect" for e in events), events[:10]
    print(f"\n{len(events)} connections and name lookups in {len({e['pid'] for e in events})} processes, "
          "none beyond loopback")


def test_telemetry_is_off_unless_the_user_turned_it_on() -> None:
    env = {"DO_NOT_TRACK": "false"}
    disable_telemetry(env)
    assert env == {**NO_TELEMETRY, "DO_NOT_TRACK": "false"}  # a user's explicit choice wins
    clean = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    probe = ("import os, sys\nfrom cass.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             f"print(sorted(k for k in {sorted(NO_TELEMETRY)!r} if k in os.environ), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe], env={**clean, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == str(sorted(NO_TELEMETRY)), proc.stderr  # set by the CLI itself


def test_processes_that_load_the_libraries_before_cass_get_the_variables_from_their_configuration() -> None:
    """A worker's flow run and the compose services import Prefect or MLflow before any cass code runs."""
    deployment_env = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["env"]
    assert {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"} <= set(deployment_env)
    services = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())["services"]
    for name, needs in (("mlflow", "MLFLOW_DISABLE_TELEMETRY"), ("prefect-server", "PREFECT_SERVER_ANALYTICS_ENABLED"),
                        ("prefect-worker", "MLFLOW_DISABLE_TELEMETRY")):
        environment = services[name]["environment"]
        assert str(environment[needs]).lower() == NO_TELEMETRY[needs] and environment["DO_NOT_TRACK"] == "true", name
