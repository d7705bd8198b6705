"""Promotion under faults, against a real `mlflow server` whose store is a PostgreSQL database: a `cass promote`
process SIGKILLed at each moment of its registry writes (the old champion or the complete new one remains, and
`cass rollback` works), concurrent promoter processes over many rounds, and `cass registry`, which explains the
champion of every registered model from the recorded decisions."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cass.config import params_from_mapping
from tests.conftest import tiny_mapping

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("adipose", "lymphocytes", "stroma", "tumor")


@pytest.fixture(scope="module")
def server(mlflow_postgres_server) -> SimpleNamespace:
    """The session's `mlflow server` on PostgreSQL (conftest); this module's models are named promo*."""
    return mlflow_postgres_server


@pytest.fixture(scope="module")
def setup(server, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    import mlflow

    from cass.tracking import reset_client

    root = tmp_path_factory.mktemp("promo")
    mapping = tiny_mapping(demo_root)
    mapping["mlflow"] = {"tracking_uri": server.url, "experiment": "cass-promo", "model_prefix": "promo"}
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    client = mlflow.MlflowClient(server.url)
    experiment = client.create_experiment("cass-promo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        yield SimpleNamespace(server=server, client=client, experiment=experiment, root=root,
                              params=params_from_mapping(mapping), params_file=params_file)
    reset_client()


def _version(s, name: str, macro_f1: float) -> str:
    """A registered version whose evaluation run holds test metrics with this macro F1 (on one test set)."""
    from mlflow.exceptions import MlflowException

    from cass.registry import METRICS_ARTIFACT

    client = s.client
    run = client.create_run(s.experiment, run_name=f"evaluate {name} {macro_f1}")
    metrics = {"macro_f1": macro_f1, "balanced_accuracy": macro_f1, "accuracy": macro_f1, "macro_auroc": 0.9,
               "num_samples": 16, "per_class": {c: {"recall": macro_f1} for c in CLASSES}}
    client.log_dict(run.info.run_id, metrics, METRICS_ARTIFACT)
    client.set_terminated(run.info.run_id)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id,
                                     tags={"test_set": "a" * 64, "evaluation_run_id": run.info.run_id})
    return str(mv.version)


def _champion(s, name: str) -> str | None:
    version = s.client.get_registered_model(name).aliases.get("champion")
    return None if version is None else str(version)


def _cli(s, *args: str) -> int:
    from cass.cli import main

    return main([*args, "--params", str(s.params_file), "-q"])


# --------------------------------------------------------------------------------------------------
# A promotion killed at each moment of its registry writes


class KillingProxy:
    """An HTTP proxy between a promoter and the mlflow server. It forwards every request and, when the server
    has answered the chosen write (method, path, n-th occurrence), SIGKILLs the promoter before the answer
    reaches it: the write is done, the process never knows."""

    def __init__(self, upstream_port: int) -> None:
        proxy = self
        self.upstream, self.victim, self.target, self.refuse = upstream_port, None, None, None
        self.counts: dict[tuple[str, str], int] = {}
        self.killed = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                proxy.forward(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def arm(self, victim: int, method: str, path: str, nth: int) -> None:
        self.victim, self.target, self.counts = victim, (method, path, nth), {}
        self.killed.clear()

    def forward(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        if self.refuse and (h.command, h.path.split("?", 1)[0].rsplit("/api/2.0/mlflow", 1)[-1]) == self.refuse:
            h.send_response(503)  # the registry is unavailable for this request
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=120)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(h.command, h.path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        path = h.path.split("?", 1)[0]
        key = (h.command, path)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.target and self.victim and not self.killed.is_set():
            method, fragment, nth = self.target
            if h.command == method and path.endswith(fragment) and self.counts[key] == nth:
                os.kill(self.victim, signal.SIGKILL)
                self.killed.set()
                h.close_connection = True
                return
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()


KILL_POINTS = {
    # moment: (method, path suffix, n-th such request of the promotion)
    "lock-taken": ("POST", "/registered-models/create", 1),
    "first-tag-written": ("POST", "/model-versions/set-tag", 1),
    "alias-moved": ("POST", "/registered-models/alias", 1),
    "summary-tags-half-written": ("POST", "/model-versions/set-tag", 4),
    "lock-released": ("DELETE", "/registered-models/delete", 1),
}


@pytest.fixture(scope="module")
def proxy(setup) -> Iterator[KillingProxy]:
    p = KillingProxy(setup.server.port)
    yield p
    p.close()


@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_promotion_killed_at_any_moment_leaves_the_old_or_the_complete_new_champion(setup, proxy, moment,
                                                                                      capsys) -> None:
    from cass import registry

    s, name = setup, f"promo-kill-{moment}"
    v1, v2 = _version(s, name, 0.60), _version(s, name, 0.70)
    for v in (v1, v2):
        assert registry.promote(name, v, s.params, client=s.client).promoted
    v3 = _version(s, name, 0.80)

    env = {**os.environ, "MLFLOW_TRACKING_URI": proxy.url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cass.cli", "promote", "--model", name, "--version", v3, "--params",
                             str(s.params_file), "-q"], cwd=s.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proxy.arm(proc.pid, *KILL_POINTS[moment])
    out, _ = proc.communicate(timeout=600)
    assert proxy.killed.is_set(), f"the promotion never reached {moment}: {out}"
    assert proc.returncode == -signal.SIGKILL

    champion = _champion(s, name)
    assert champion in (v2, v3), f"champion v{champion} after a kill at {moment}"
    if moment in ("alias-moved", "summary-tags-half-written", "lock-released"):
        assert champion == v3
    # The killed promoter's lock does not block the operator (its process is gone, so it is broken at once), and
    # the champion's record says where to roll back to, whatever moment the kill hit.
    started = time.monotonic()
    assert _cli(s, "rollback", "--model", name, "--reason", f"after a kill at {moment}") == 0
    assert time.monotonic() - started < 60
    expected = v1 if champion == v2 else v2
    assert _champion(s, name) == expected
    assert f"-> v{expected}" in capsys.readouterr().out

    _, records = registry.history(name, s.client)
    mine = [d for d in records if d.version == v3]
    if champion == v2:  # the old state: v3's decision, if recorded, is marked as never applied
        assert all(d.applied is False for d in mine), mine
    else:  # the complete new state: v3's decision, with who, when, why and what it replaced
        [d] = mine
        assert d.applied and d.decision == "promoted" and d.replaced == v2 and d.previous_champion == v2
        assert d.at and d.by and "beats champion v2" in d.reason
        tags = s.client.get_model_version(name, v3).tags  # the plain tags, completed from the record
        assert tags["previous_champion"] == v2 and tags["promoted_at"] == d.at and tags["rollback_reason"]
    restored = [d for d in records if d.decision == "restored"]
    assert restored[-1].version == expected and restored[-1].applied and restored[-1].replaced == champion


def test_registry_failure_mid_promotion_is_one_line_exit_7_and_the_champion_stays(setup, proxy, monkeypatch,
                                                                                   capsys) -> None:
    from cass import registry

    s, name = setup, "promo-refused-alias"
    v1 = _version(s, name, 0.60)
    assert registry.promote(name, v1, s.params, client=s.client).promoted
    v2 = _version(s, name, 0.80)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy.refuse = ("POST", "/registered-models/alias")  # the alias move fails
    try:
        capsys.readouterr()
        assert _cli(s, "promote", "--model", name, "--version", v2) == 7
    finally:
        proxy.refuse = None
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err, err
    assert f"{name}: promoting v{v2} failed in the MLflow registry" in line and "retry" in line
    assert _champion(s, name) == v1
    _, records = registry.history(name, s.client)
    assert [d.applied for d in records if d.version == v2] == [False]  # recorded, never applied
    assert not s.client.search_registered_models(f"name LIKE '{name}{registry.LOCK_SUFFIX}%'")  # released


# --------------------------------------------------------------------------------------------------
# Concurrent promoters

PROMOTER = textwrap.dedent("""
    import json, sys, time, traceback
    from pathlib import Path
    import mlflow
    from cass import registry
    from cass.config import params_from_mapping
    from cass.errors import CassError

    url, name, version, barrier, rounds, out = sys.argv[1:7]
    params = params_from_mapping({"mlflow": {"tracking_uri": url, "lock_timeout_s": 300}})
    client = mlflow.MlflowClient(url)
    passing = lambda metrics: registry.GateVerdict(True)
    with open(out, "w") as log:
        for r in range(int(rounds)):
            Path(barrier, f"ready-{r}-{version}").touch()
            while not Path(barrier, f"go-{r}").exists():
                time.sleep(0.01)
            try:
                result = registry.promote(name, version, params, force=True, reason=f"round {r}", gate=passing,
                                          client=client)
                row = {"round": r, "code": 0, "message": result.summary()}
            except CassError as exc:
                row = {"round": r, "code": exc.exit_code, "message": str(exc)}
            except BaseException:
                row = {"round": r, "code": None, "message": traceback.format_exc()}
            log.write(json.dumps(row) + "\\n")
            log.flush()
""")


def test_concurrent_promoters_never_crash_and_leave_one_consistent_champion(setup, tmp_path) -> None:
    from cass import registry

    s, name, promoters, rounds = setup, "promo-race", 4, 20
    versions = [_version(s, name, 0.6 + 0.01 * i) for i in range(promoters)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, s.server.url, name, v, str(tmp_path), str(rounds),
                               str(tmp_path / f"out-{v}.jsonl")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for v in versions]
    try:
        for r in range(rounds):  # release all promoters of a round together
            deadline = time.monotonic() + 300
            while not all((tmp_path / f"ready-{r}-{v}").exists() for v in versions):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), f"round {r} never ready"
                time.sleep(0.02)
            (tmp_path / f"go-{r}").touch()
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    rows = [json.loads(line) for v in versions for line in (tmp_path / f"out-{v}.jsonl").read_text().splitlines()]
    assert len(rows) == promoters * rounds
    unhandled = [r for r in rows if r["code"] not in (0, 7)]
    assert not unhandled, unhandled[0]["message"]
    for row in rows:
        assert "Traceback" not in row["message"]
        if row["code"] == 7:  # a registry error: one clear line that says what to do
            assert "\n" not in row["message"] and "retry" in row["message"]
    assert sum(r["code"] == 0 for r in rows) >= rounds  # the lock lets promotions through

    champion, records = registry.history(name, s.client)
    promoted = [d for d in records if d.decision == "promoted"]
    assert promoted and all(d.applied for d in promoted)  # no decision recorded without its alias move
    assert champion == promoted[-1].version
    for before, after in itertools.pairwise(promoted):  # each promotion replaced the one before
        assert after.replaced == before.version
    assert [d.seq for d in records] == list(range(1, len(records) + 1))
    assert not [m for m in registry.registered_models(s.client) if registry.LOCK_SUFFIX in m]
    assert not s.client.search_registered_models(f"name LIKE '{name}{registry.LOCK_SUFFIX}%'")


# --------------------------------------------------------------------------------------------------
# `cass registry`: the champion explained


def test_registry_command_explains_each_champion_with_its_full_history(setup, capsys, caplog) -> None:
    import logging

    from cass import registry

    s = setup
    name, other = "promo-view-cnn", "promo-view-vit"
    v1, v2, v3 = _version(s, name, 0.60), _version(s, name, 0.605), _version(s, name, 0.75)
    w1 = _version(s, other, 0.7)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="cass"):
        assert _cli(s, "promote", "--model", name, "--version", v1) == 0
    first = capsys.readouterr().out + caplog.text
    assert "vNone" not in first and "first champion" in first
    assert _cli(s, "promote", "--model", name, "--version", v2) == 1  # does not beat v1 by the margin
    assert _cli(s, "promote", "--model", name, "--version", v3) == 0
    promoted = capsys.readouterr().out
    reason = s.client.get_model_version(name, v3).tags["promotion_reason"]
    assert len(reason) > 60

    # The gate report is attached to the version's evaluation run, and the promotion says where.
    report = s.client.get_model_version(name, v3).tags["promotion_gate_report"]
    assert report.startswith("runs:/") and report.endswith("data_docs/index.html") and report in promoted
    assert "/tmp" not in promoted and "cass-model-gate" not in promoted + caplog.text
    import mlflow

    page = Path(mlflow.artifacts.download_artifacts(artifact_uri=report, dst_path=str(s.root / "report")))
    assert page.is_file() and "<html" in page.read_text().lower()

    assert _cli(s, "rollback", "--model", name, "--reason", "drift on site B") == 0
    assert _cli(s, "promote", "--model", other, "--version", w1) == 0
    capsys.readouterr()

    assert _cli(s, "registry") == 0
    out = capsys.readouterr().out
    assert name in out and other in out and registry.LOCK_SUFFIX not in out
    assert _cli(s, "registry", name) == 0
    mine = capsys.readouterr().out
    user = registry._user()
    lines = mine.splitlines()
    assert lines[0] == name
    assert lines[1].startswith(f"  champion: v{v1}, restored by rollback") and f"by {user}" in lines[1]
    assert "why: drift on site B" in mine and f"rollback goes to: v{v3}" not in mine
    history = [line.strip() for line in lines if line.startswith("    #")]
    assert len(history) == 4, mine
    assert f"v{v1} promoted (first champion) by {user}" in history[0]
    assert f"v{v2} refused by {user}" in history[1] and "does not beat" in history[1]
    assert f"v{v3} promoted (replacing v{v1}) by {user}: {reason}" in history[2]  # the whole reason
    assert f"v{v1} restored by rollback (replacing v{v3})" in history[3] and "drift on site B" in history[3]
    assert _cli(s, "registry", "no-such-model") == 7


# --------------------------------------------------------------------------------------------------
# The gate report


def test_the_gate_report_is_attached_only_to_a_decision_taken_under_the_lock(tmp_path: Path, demo_root: Path,
                                                                             monkeypatch) -> None:
    """A promotion of the champion itself decides nothing, and one that waits out another's lock decides
    nothing either: neither adds a ``promotion_gate/`` folder to the version's evaluation run."""
    import mlflow

    from cass import registry
    from cass.errors import CassError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    mapping = tiny_mapping(demo_root)
    mapping["mlflow"] = {"tracking_uri": uri, "lock_timeout_s": 0.5}
    s = SimpleNamespace(client=client, params=params_from_mapping(mapping),
                        experiment=client.create_experiment("gate-reports", (tmp_path / "mlruns").as_uri()))
    report = tmp_path / "report"
    report.mkdir()
    (report / "result.json").write_text("{}")
    passing = lambda metrics: registry.GateVerdict(True, report=report)  # noqa: E731

    def attached(version: str) -> int:
        run_id = client.get_model_version(name, version).tags["evaluation_run_id"]
        return len(client.list_artifacts(run_id, registry.GATE_REPORTS))

    name = "gate-reports"
    v1, v2 = _version(s, name, 0.60), _version(s, name, 0.80)
    try:
        assert registry.promote(name, v1, s.params, gate=passing, client=client).promoted
        assert attached(v1) == 1
        result = registry.promote(name, v1, s.params, gate=passing, client=client)
        assert not result.promoted and result.reason == "already the champion"
        assert attached(v1) == 1
        # Another promoter holds the lock (alive, on another host): this one times out and decides nothing.
        client.create_registered_model(f"{name}{registry.LOCK_SUFFIX}", tags={
            "owner": "other", "acquired_at": f"{time.time():.3f}", "host": "elsewhere", "pid": "1"})
        with pytest.raises(CassError, match="another promotion"):
            registry.promote(name, v2, s.params, gate=passing, client=client)
        assert attached(v2) == 0 and _champion(s, name) == v1
    finally:
        mlflow.set_tracking_uri(None)


def test_a_dead_holders_lock_is_broken_at_once_only_in_the_same_pid_namespace_and_boot(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """Containers that share a host name (host networking) do not share pids: a lock whose holder's pid is
    missing here is broken at once only when it was taken in this PID namespace since this boot; otherwise,
    and for a lock without these tags, only its age counts."""
    import mlflow

    from cass import mutex, registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    cfg = params_from_mapping({"mlflow": {"tracking_uri": uri, "lock_stale_s": 900}}).mlflow
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    holder = {**mutex.holder(), "pid": str(dead.pid), "owner": "o", "acquired_at": f"{time.time():.3f}"}
    assert holder["pid_ns"] and holder["boot_id"]

    def broken_at_once(tags: dict[str, str]) -> bool:
        lock = f"m-{len(client.search_registered_models())}{registry.LOCK_SUFFIX}"
        client.create_registered_model(lock, tags=tags)
        mutex.break_if_stale(client, lock, cfg.lock_stale_s)
        return not client.search_registered_models(f"name = '{lock}'")

    assert broken_at_once(holder)
    assert not broken_at_once({**holder, "pid_ns": "4026531836" if holder["pid_ns"] != "4026531836" else "1"})
    assert not broken_at_once({**holder, "boot_id": "00000000-0000-0000-0000-000000000000"})
    assert not broken_at_once({k: v for k, v in holder.items() if k not in ("pid_ns", "boot_id")})  # an older lock
    assert broken_at_once({**holder, "pid_ns": "1", "acquired_at": f"{time.time() - 1000:.3f}"})  # too old
