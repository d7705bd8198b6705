"""Every report the platform writes reads fully with no network, as hospital sites run: Great Expectations
Data Docs, the page of `dvc plots show` and the model card, each opened in headless Chromium (Debian's
`chromium`, driven by Playwright) with every request that leaves the machine refused.

A page passes when what only appears once it is fully rendered is there (the rows of the Data Docs index,
which GX fills with a script; the drawn Vega plots; loaded images and visible pass/fail marks) and it asked
the network for nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cass.config import Params
from cass.model_card import to_html
from cass.quality import validate_model, validate_splits
from tests.conftest import service_unavailable

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")


@dataclass
class Opened:
    """A page as the browser rendered it, and what it asked for beyond the local files."""

    page: object
    remote_requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, selector: str) -> int:
        return self.page.locator(selector).count()

    def loaded_images(self) -> list[str]:
        return self.page.eval_on_selector_all("img", "els => els.filter(e => e.complete && e.naturalWidth > 0)"
                                              ".map(e => e.getAttribute('src').slice(0, 80))")


class OfflineBrowser:
    """Headless Chromium with the network cut off: names resolve nowhere, traffic goes to a closed proxy, and
    each request that is not a local file is refused and recorded."""

    def __init__(self, browser) -> None:
        self.browser = browser
        self.opened: list = []

    def open(self, path: Path) -> Opened:
        return self.open_url(path.resolve().as_uri())

    def open_url(self, url: str, local_server: str | None = None) -> Opened:
        """``url`` in a fresh browser (no cookies, no local storage); ``local_server``: an origin on this
        machine (a loopback port) that may be asked too."""
        context = self.browser.new_context(service_workers="block")
        self.opened.append(context)
        page = context.new_page()
        opened = Opened(page)
        allowed = ("file:", "data:", *((f"{local_server}/",) if local_server else ()))

        def route(r) -> None:
            if r.request.url.startswith(allowed):
                r.continue_()
            else:
                opened.remote_requests.append(r.request.url)
                r.abort("internetdisconnected")

        context.route("**/*", route)
        page.on("pageerror", lambda e: opened.errors.append(str(e)))
        page.goto(url, wait_until="load")
        return opened

    def wait_for(self, opened: Opened, selector: str, count: int, timeout_s: float = 30) -> int:
        """How many ``selector`` elements the page shows once ``count`` of them are there, or after ``timeout_s``
        (what a script draws after the page has loaded, such as a Vega plot)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        with contextlib.suppress(PlaywrightTimeout):
            opened.page.wait_for_function(f"document.querySelectorAll({selector!r}).length >= {count}",
                                          timeout=timeout_s * 1000)
        return opened.count(selector)

    def close(self) -> None:
        for context in self.opened:
            context.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[OfflineBrowser]:
    if not Path(CHROMIUM).is_file():
        service_unavailable(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                  "--proxy-server=127.0.0.1:9"],
        )
        offline = OfflineBrowser(chromium)
        try:
            yield offline
        finally:
            offline.close()
            chromium.close()


# --------------------------------------------------------------------------------------------------
# Great Expectations Data Docs


def _failing_metrics(path: Path) -> Path:
    classes = ("adipose", "lymphocytes", "stroma", "tumor")
    path.write_text(json.dumps({
        "macro_f1": 0.3, "balanced_accuracy": 0.85, "accuracy": 0.85, "macro_auroc": 0.93,
        "per_class": {c: {"recall": 0.8, "precision": 0.8} for c in classes},
    }))
    return path


def test_data_docs_render_their_tables_and_verdicts_offline(
    browser: OfflineBrowser, tmp_path: Path, tiny_params: Params, prepared_dir: Path
) -> None:
    # Guards: GX's index page fills its tables with bootstrap-table from a CDN, so offline it listed no
    # validation and no suite, and every page lost its pass/fail icons (Font Awesome, from a CDN too).
    model = validate_model(tiny_params, _failing_metrics(tmp_path / "metrics.json"), tmp_path / "model",
                           raise_on_failure=False)
    splits = validate_splits(tiny_params, prepared_dir, tmp_path / "splits", raise_on_failure=False)
    assert not model.success and splits.success
    for result in (model, splits):
        assert result.docs is not None
        index = browser.open(result.docs)
        suites = {f"{result.suite}.{table}" for table in result.rows}
        tables = index.page.locator("table")
        assert tables.count() == 2, "the index shows a table of validations and one of suites"
        validations, listed = tables.nth(0).locator("tbody tr"), tables.nth(1).locator("tbody tr")
        assert validations.count() == len(suites) and listed.count() == len(suites)
        assert {listed.nth(i).inner_text().strip() for i in range(listed.count())} == suites
        verdicts = index.page.locator("tbody tr td:first-child").all_inner_texts()
        assert sum("Failed" in v for v in verdicts) == (0 if result.success else 1), verdicts
        assert index.remote_requests == [] and index.errors == []
        assert index.loaded_images(), "the logo comes from the site's own static folder"

        # Each row links to its page; the pages show their tables, with a visible mark for each check's verdict.
        links = index.page.eval_on_selector_all("tbody tr td:first-child a", "els => els.map(e => e.href)")
        assert len(links) == 2 * len(suites)
        marks = []
        for link in links:
            page = browser.open(Path(link.removeprefix("file://")))
            assert page.count("tbody tr") > 0, link
            assert page.remote_requests == [] and page.errors == [], link
            marks += page.page.eval_on_selector_all(
                ".fa-check-circle, .fa-times", "els => els.map(e => getComputedStyle(e, '::before').content)")
        assert marks and all(m not in ("none", "normal", "") for m in marks), marks


# --------------------------------------------------------------------------------------------------
# DVC plots


def _plot_files(plots: list) -> tuple[dict[str, set[str]], list[str]]:
    """The data files (with the columns plotted from them) and the images the plots section of dvc.yaml names."""
    data: dict[str, set[str]] = {}
    images: list[str] = []
    for entry in plots:
        if isinstance(entry, str):  # a file: an image, or a table plotted with DVC's defaults
            if entry.endswith(IMAGE_SUFFIXES):
                images.append(entry)
            else:
                data.setdefault(entry, set()).add("value")
            continue
        (name, spec), = entry.items()
        x, y = spec.get("x", "step"), spec.get("y")
        if isinstance(y, dict):
            for path, cols in y.items():
                data.setdefault(path, set()).update([x, *([cols] if isinstance(cols, str) else cols)])
        else:
            data.setdefault(name, set()).update([x, *([y] if isinstance(y, str) else y or [])])
    return data, images


def _dvc(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_dvc_plots_of_the_pipeline_all_render_offline(browser: OfflineBrowser, tmp_path: Path) -> None:
    # Guards: DVC's page loads Vega from a CDN, so offline only the image plots showed and every curve
    # (pretraining loss, collapse check, fine-tuning loss and validation F1) stayed blank.
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    data, images = _plot_files(plots)
    assert len(data) >= 3 and len(images) >= 6, "dvc.yaml defines the pipeline's curves and figures"
    for path, columns in data.items():
        rows = [",".join(sorted(columns))]
        rows += [",".join(str(e if c == "epoch" else round(1 / e + 0.1 * i, 4)) for i, c in enumerate(sorted(columns)))
                 for e in range(1, 6)]
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("\n".join(rows) + "\n")
    for path in images:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 40, 40)).save(repo / path)

    _dvc("plots", "show", "-o", "plots", cwd=repo)
    page = browser.open(repo / "plots" / "index.html")
    series = len(plots) - len(images)
    drawn = browser.wait_for(page, ".vega-embed canvas, .vega-embed svg.marks", series)
    assert drawn == series, f"{drawn} of the {series} data-series plots were drawn"
    assert len(page.loaded_images()) == len(images), page.loaded_images()
    assert page.remote_requests == [] and page.errors == []


# --------------------------------------------------------------------------------------------------
# Model card


def test_model_card_renders_offline(browser: OfflineBrowser, tmp_path: Path) -> None:
    # Guards: the card a registered version carries must read without network (figures embedded, CSS inline).
    figure = tmp_path / "reliability.png"
    Image.new("RGB", (60, 40), (20, 90, 160)).save(figure)
    text = ("# cass-vit v3\n\n| metric | value |\n|---|---|\n| macro F1 | 0.91 |\n| ECE | 0.04 |\n\n"
            "![Reliability diagram](reliability.png)\n")
    card = tmp_path / "card" / "model_card.html"
    card.parent.mkdir()
    card.write_text(to_html(text, {"reliability.png": figure}, "cass-vit v3"))
    figure.unlink()  # the page must not need the file beside it
    page = browser.open(card)
    assert page.count("table tbody tr") == 2
    assert len(page.loaded_images()) == 1
    assert page.remote_requests == [] and page.errors == []


# --------------------------------------------------------------------------------------------------
# The MLflow UI


@pytest.mark.slow
def test_the_mlflow_ui_opens_the_experiment_on_its_runs_table(browser: OfflineBrowser, tmp_path: Path,
                                                                 tiny_params: Params) -> None:
    # Guards: with MLflow 3.17 a fresh browser opened the experiment on the GenAI overview, the experiment's
    # mlflow.experimentKind tag notwithstanding: the UI reads its "workflow type" instead (cass.tracking.client).
    from cass.tracking import RunLogger, configure, experiment_id, reset_client, ui_url
    from tests.conftest import MlflowServer

    server = MlflowServer(tmp_path, env={"MLFLOW_DISABLE_TELEMETRY": "true"})
    server.start()
    try:
        cfg = tiny_params.mlflow.model_copy(update={"tracking_uri": server.url, "experiment": "cass-ui"})
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            configure(cfg)  # creates the experiment as every cass command does
            experiment = experiment_id(cfg)
            run = RunLogger.create(cfg, experiment, "demo@0123abcd lf=0.1 11-30 16:40", {"stage": "pipeline"})
            run.finish()
            reset_client()
        link = ui_url(server.url, experiment)
        page = browser.open_url(link, local_server=server.url)
        page.page.get_by_text("demo@0123abcd lf=0.1 11-30 16:40").wait_for(timeout=90_000)  # the runs table
        assert page.page.get_by_role("heading", name="Runs").count() == 1
        assert page.page.get_by_role("heading", name="Overview").count() == 0  # not the GenAI overview
        # The same fresh browser on the bare experiment page shows what the query changes.
        bare = browser.open_url(f"{server.url}/#/experiments/{experiment}", local_server=server.url)
        bare.page.get_by_role("heading", name="Overview").wait_for(timeout=90_000)
        assert bare.page.get_by_text("demo@0123abcd lf=0.1 11-30 16:40").count() == 0
        assert not page.remote_requests, page.remote_requests  # the UI is served whole by the server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# Data-change report


def test_data_change_report_renders_offline(browser: OfflineBrowser, tmp_path: Path, demo_root: Path,
                                           prepared_dir: Path) -> None:
    # Guards: "why it retrained" is read where the models run, often with no network: the page carries its
    # histogram and styles itself.
    from cass import data_change
    from cass.comparison import unseen_rows
    from cass.data.manifest import read_manifest

    before = read_manifest(prepared_dir)[0].astype(str)
    after = before.copy()
    after.loc[after.index[:4], "split"] = "test"  # some images changed split
    after = after.drop(index=after.index[-3:])  # and some were removed
    report = data_change.build("cass-demo-cnn", "1", before, after, demo_root, 7,
                               {"macro_f1": 0.9, "accuracy": 0.91}, {"macro_f1": 0.8, "accuracy": 0.82},
                               unseen_rows(before, after), ("a" * 64, "b" * 64))
    folder = data_change.write(report, tmp_path / "report")
    (folder / data_change.HISTOGRAM_PNG).unlink()  # the page must not need the file beside it
    page = browser.open(folder / data_change.REPORT_HTML)
    assert page.page.locator("h1").inner_text().startswith("Data change since champion v1")
    assert page.count("table") == 4  # per class and split, balance, image statistics, decay
    assert "3 removed" in page.page.inner_text("body")
    assert len(page.loaded_images()) == 1  # the grey-level histograms, embedded
    assert page.remote_requests == [] and page.errors == []
    assert json.loads((folder / data_change.REPORT_JSON).read_text())["change"]["removed"] == 3
