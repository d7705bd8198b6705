"""Shared fixtures: tiny settings, small generated data, and real services on loopback.

Services: PostgreSQL is expected on 127.0.0.1:5432 (trust auth); tests that need it skip with a reason
when no server answers, unless CASS_REQUIRE_SERVICES=1 (set by .ci/run), which turns the skip into a
failure. An S3 endpoint is started with moto_server on a free loopback port for the session.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cass.config import Params, params_from_mapping
from cass.data.demo import generate_demo
from cass.data.prepare import prepare_data
from cass.telemetry import disable_telemetry

disable_telemetry()  # every test and the processes it starts: no usage telemetry (before MLflow or Prefect load)

REQUIRE_SERVICES = os.environ.get("CASS_REQUIRE_SERVICES") == "1"

# Tiny networks train fastest on one thread on 2 cores: with two, OpenMP threads spin against the servers, the
# worker processes and each other (three training tests took 92 s on a busy machine, 5 s on one thread).
# Set before torch is imported; subprocesses (cass commands, workers, torchrun) inherit it; a user's value stands.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Prefect keeps state in PREFECT_HOME (default ~/.prefect: the memo store of `prefect deploy`, the database of a
# temporary server that `cass demo` starts): each test process gets its own, so that the pytest-xdist workers
# (and a test run beside the user's own Prefect work) never share one. Set before Prefect is imported.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"cass-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Parallel runs on pytest-xdist workers (`-n 2 --dist loadscope`). Each worker is a pytest process of its own:
# session fixtures (servers on free ports, fresh databases, tmp folders, PREFECT_HOME) start once per worker, and
# a module's tests run on one worker, so a module fixture (a trained project, a flow run) is built once.
# `-n 0` runs in this process (pdb, -s); so does `-p no:xdist`, also where the options ask for workers.
# (Not --dist loadgroup: with pytest 9.2, pytest-xdist 3.8 cannot tag the tests' ids with their group, so
# xdist_group marks are ignored and a module fixture is built on both workers.)


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    if not pluginmanager.has_plugin("xdist"):  # `-p no:xdist`: accept the addopts' xdist options, run serially
        group = parser.getgroup("xdist")  # _addoption: the one way to a lowercase short option, as xdist does it
        group._addoption("-n", "--numprocesses", dest="numprocesses", default=None, help="ignored: -p no:xdist")
        group._addoption("--dist", dest="dist", default="no", help="ignored: -p no:xdist")
        group._addoption("--no-loadscope-reorder", dest="loadscopereorder", action="store_false", default=True,
                         help="ignored: -p no:xdist")


LONGEST_MODULES = ("test_dvc.py", "test_flows.py", "test_promotion.py", "test_dvc_experiments.py")
"""The modules that take longest (minutes each), handed out first in this order. Each worker is sent two modules
at the start (first and third to one, second and fourth to the other), so the two DVC modules land on different
workers, and the experiments' copy of the DVC project (built once per run by test_dvc's worker) is ready by the
time its worker, busy with the flows first, gets to it."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist workers, the longest modules come first (:data:`LONGEST_MODULES`), then those with the most slow
    tests (they are handed out in this order, with --no-loadscope-reorder), so the quick modules fill the gaps at
    the end instead of a long one starting last. A module's tests keep their order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)

    def order(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        return (LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES), -slow[item.path])

    items.sort(key=order)  # stable: ties keep the collection order


def service_unavailable(reason: str) -> None:
    """Skip (laptop) or fail (CI) a test whose service is not there."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (CASS_REQUIRE_SERVICES=1 makes this a failure)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a process group a test started (a server, or a worker and its flow-run children): SIGTERM, then
    SIGKILL if it outlives ``timeout`` seconds. How it shuts down is the library's business, not the test's."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class MlflowServer:
    """`mlflow server` on a loopback port with artifacts proxied to ``artifacts_destination`` (default: a
    SQLite store and a folder under ``folder``), in its own process group so a test can crash and restart it."""

    def __init__(self, folder: Path, backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
        self.artifacts = artifacts_destination or str(folder / "artifacts")
        # MLflow's job runner (GenAI jobs, trace roll-ups; nothing cass uses) starts four more Python processes per
        # server that import mlflow and poll in the background, CPU a 2-core machine needs for training.
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.log = folder / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> None:
        import urllib.request

        exe = Path(sys.executable).parent / "mlflow"
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [str(exe), "server", "--backend-store-uri", self.store, "--serve-artifacts", "--artifacts-destination",
                 self.artifacts, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server at {self.url} not healthy after {timeout}s: {self.log.read_text()[-2000:]}")

    def ensure_running(self) -> None:
        """Start the server again where a test crashed it: a shared server outlives the test that killed it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def kill(self) -> None:
        """A crash: the server and its workers (one process group, started by this test) die at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout=20)


# --------------------------------------------------------------------------------------------------
# Settings and data


# One- or two-epoch test networks may miss a class or score low (the tiny ViT often predicts one class):
# tests that register and promote let the model gate only warn.
LENIENT_MODEL_GATE = {"min_macro_f1": 0.0, "min_balanced_accuracy": 0.0, "severity": {"class_recall_nonzero": "warn"}}


def tiny_mapping(root: Path) -> dict:
    """Settings for tests: tiny timm networks, 32-px images, one epoch, no worker processes."""
    return {
        "seed": 7,
        "data": {"name": "demo", "root": str(root), "layout": "imagefolder", "demo_images_per_class": 16,
                 "demo_image_size": 32, "workers": 1},
        "split": {"val": 0.2, "test": 0.25, "seed": 7, "label_fractions": [0.25, 1.0]},
        "model": {"cnn": "test_resnet", "vit": "test_vit", "image_size": 32, "embed_dim": 16},
        "pretrain": {"epochs": 1, "batch_size": 8, "num_workers": 0, "lr": 1e-3},
        "finetune": {"epochs": 2, "batch_size": 8, "num_workers": 0, "label_fraction": 1.0, "patience": 2},
        "evaluate": {"batch_size": 16},
    }


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (4 classes x 16 images, 32 px), generated once per session."""
    root = tmp_path_factory.mktemp("demo-data") / "demo"
    generate_demo(root, images_per_class=16, size=32)
    return root


@pytest.fixture
def tiny_params(demo_root: Path) -> Params:
    return params_from_mapping(tiny_mapping(demo_root))


@pytest.fixture(scope="session")
def prepared_dir(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset prepared once per session (manifest, splits, subsets). Treat as read-only."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    return prepare_data(params_from_mapping(tiny_mapping(demo_root)), out)


# --------------------------------------------------------------------------------------------------
# Services


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint over HTTP: moto_server on a free loopback port, for the whole session."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        service_unavailable("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 (and everything built on it) at the moto endpoint with dummy credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto endpoint."""
    from cass.storage import s3_client

    name = f"cass-test-{uuid.uuid4().hex[:10]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server (temporary database) for the session, shared by every test that runs a flow."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def shared_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One `mlflow server` (SQLite store, artifacts in a folder) for the session: each start of a fresh one
    creates its schema, seconds on a busy machine. Tests keep apart by experiment and model names. A fault test
    may crash it; module fixtures call ``ensure_running()``, tests take ``mlflow_server``."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(shared_mlflow_server: MlflowServer) -> MlflowServer:
    """The session's `mlflow server`, answering (started again if an earlier test left it crashed)."""
    shared_mlflow_server.ensure_running()
    return shared_mlflow_server


PG_ADMIN_URL = os.environ.get("CASS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def fresh_database(prefix: str = "cass_test") -> Iterator[str]:
    """Create a database on the local PostgreSQL server, yield its URL, drop it afterwards."""
    try:
        import psycopg2
    except ImportError:
        service_unavailable("psycopg2 is not installed")
    try:
        admin = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        service_unavailable(f"no PostgreSQL server at {PG_ADMIN_URL} ({str(exc).strip()})")
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server for one test."""
    with fresh_database() as url:
        yield url


MLFLOW_S3_SECRET = "aws-secret-key-5b9c"
"""The S3 secret key of ``mlflow_postgres_server``'s process: a test checks it never reaches a record."""


def s3_client_for(endpoint: str, secret: str = MLFLOW_S3_SECRET):
    """A boto3 S3 client of the moto endpoint (moto takes any credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key=secret,
                        config=Config(request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


@pytest.fixture(scope="session")
def mlflow_postgres_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`mlflow server` in its production shape, once per session (its schema migrations on a fresh database take
    many seconds): backend store a database on the local PostgreSQL, artifacts proxied to a bucket on
    moto_server. Tests keep apart by experiment and model names."""
    from types import SimpleNamespace

    with fresh_database("cass_mlflow") as url:
        bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
        s3 = s3_client_for(s3_endpoint)
        s3.create_bucket(Bucket=bucket)
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2.
        store = url.replace("postgresql://", "postgresql+psycopg2://", 1)
        env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": MLFLOW_S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
        srv = MlflowServer(tmp_path_factory.mktemp("mlflow-pg-server"), store, f"s3://{bucket}/", env)
        try:
            srv.start(240)
            yield SimpleNamespace(url=srv.url, port=srv.port, bucket=bucket, s3=s3, s3_endpoint=s3_endpoint)
        finally:
            srv.stop()


def noisy_classifier(rng, n: int, k: int, strength: float):
    """Labels of ``n`` single-label samples over ``k`` classes and the softmax output of a classifier that
    favours the true class by a random share of ``strength``: realistic, imperfect scores for metric tests."""
    import numpy as np

    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + strength * np.eye(k)[y] * rng.random((n, 1))
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def kill_when_logged(server: MlflowServer, experiment: str, filter_string: str, metric: str,
                     stop: Callable[[], bool], timeout: float = 1200) -> float | None:
    """Crash ``server`` as soon as a run of ``experiment`` matching ``filter_string`` has logged ``metric``
    (e.g. a fine-tuning's first epoch); returns when (``time.monotonic()``), or None once ``stop()`` is true."""
    import mlflow

    client = mlflow.MlflowClient(server.url)
    deadline = time.monotonic() + timeout
    while not stop() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the experiment or the run may not exist yet
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id], filter_string) if exp else []
            if any(metric in run.data.metrics for run in runs):
                server.kill()
                return time.monotonic()
        time.sleep(0.2)
    return None
