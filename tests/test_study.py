"""`cass study`: a small study end to end with a real MLflow store and a real Prefect server, killed part-way
and resumed (only the missing cells train), its report opened offline; a study spread over a process worker of
the pool (one flow run per method and seed); and the statistics, the decision rule and the recommendation that
`pretrain.variant: auto` follows, on numbers made for them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import stop_group, tiny_mapping

from cass.config import params_from_mapping
from cass.study import recommend, stats
from cass.study.plan import RESULT_FILE
from cass.variants import choose_recipe
from tests.test_reports_offline import browser  # noqa: F401 - the offline Chromium fixture

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["no pretraining", "CASS"]
CELLS = 2 * 2 * 2 * 2  # methods x fractions x seeds x networks
KILL_AFTER = 3


def _mapping(tmp: Path, demo_root: Path) -> dict:
    m = tiny_mapping(demo_root)
    m["mlflow"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_location": str(tmp / "mlruns"),
                   "experiment": "cass-study-test", "open_runs_file": str(tmp / "open-runs.json")}
    m["pretrain"].update(monitor_every=0)
    m["finetune"].update(epochs=1)
    m["evaluate"]["explain_per_class"] = 0
    m["study"] = {"methods": METHODS, "fractions": [0.25, 1.0], "seeds": [1, 2],
                  "recommendations": str(tmp / "recommendations")}
    return m


def _results(outputs: Path) -> list[Path]:
    return sorted(outputs.glob(f"study/*/cells/**/{RESULT_FILE}"))


@pytest.fixture(scope="module")
def study(prefect_api: str, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`cass study` through the flow in a subprocess, killed after a few cells; then the flow again here."""
    from flows.study import run_study_flow, study_group

    tmp = tmp_path_factory.mktemp("study")
    mapping = _mapping(tmp, demo_root)
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    outputs = tmp / "outputs"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cass", "study", "--params", str(params_file), "--outputs",
                             str(outputs), "-q"], cwd=tmp, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(_results(outputs)) < KILL_AFTER and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the study ended by itself ({proc.returncode}) before the kill\n{err}"
    # One method and seed of the rest as a worker of the pool runs it (flows/study.py:study_group).
    killed_with = {p.parent.relative_to(p.parents[4]).as_posix() for p in _results(outputs)}
    last = next(c for c in reversed(make_plan_of(mapping, outputs).cells) if c.key not in killed_with)
    group = study_group(str(params_file), [], str(outputs), last.method, last.seed)
    done_before = {p.parent.relative_to(p.parents[4]).as_posix() for p in _results(outputs)}
    params = params_from_mapping(mapping)
    started = time.perf_counter()
    outcome = run_study_flow(params, str(params_file), [], str(outputs))
    return {"outcome": outcome, "done_before": done_before, "params": params, "outputs": outputs,
            "seconds": time.perf_counter() - started, "killed_with": killed_with, "group": group}


def make_plan_of(mapping: dict, outputs: Path):
    from cass.outputs import Layout
    from cass.study.plan import make_plan

    return make_plan(params_from_mapping(mapping), Layout(outputs).data, outputs)


@pytest.mark.slow
def test_a_killed_study_resumes_with_only_the_missing_cells(study: dict) -> None:
    import mlflow

    outcome, done_before = study["outcome"], study["done_before"]
    assert KILL_AFTER <= len(study["killed_with"]) < len(done_before) < CELLS
    assert set(study["group"]["ran"]) == done_before - study["killed_with"]  # the group's missing cells, only
    assert set(outcome["skipped"]) == done_before
    assert len(outcome["ran"]) == CELLS - len(done_before) and not set(outcome["ran"]) & done_before
    assert len(_results(study["outputs"])) == CELLS

    # One parent run; one FINISHED child run per cell, none left RUNNING by the kill; the report on the parent.
    mlflow.set_tracking_uri(study["params"].mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["recommended"] == outcome["recommended"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["study_cell"] for r in finished) == sorted(outcome["ran"] + outcome["skipped"])
    assert not [r for r in children if r.info.status == "RUNNING"]
    cell = finished[0]
    assert {"study.method", "study.fraction", "study.seed", "study.network"} <= set(cell.data.params)
    assert 0.0 <= cell.data.metrics["test_macro_f1"] <= 1.0
    listed = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/study.html", "study/macro_f1.png", "study/recommendation.yaml", "study/results.csv"} <= listed

    # The report is one page that needs nothing from outside (the offline browser test below opens it).
    page = Path(outcome["report"]).read_text()
    assert 'src="data:image/png;base64,' in page and "<script" not in page
    assert "http://" not in page and "https://" not in page

    # The recommendation: a fragment, and the record `pretrain.variant: auto` follows for this data.
    fragment = Path(outcome["fragment"]).read_text()
    assert outcome["recommended"] in fragment and "finetune:" in fragment
    data_dir = study["outputs"] / "data"
    rec = recommend.lookup(study["params"], data_dir)
    assert rec is not None and rec.method == outcome["recommended"] and rec.study == outcome["study"]
    auto = params_from_mapping({**study["params"].model_dump(mode="json"),
                                "pretrain": {**study["params"].pretrain.model_dump(mode="json"), "variant": "auto"}})
    chosen, why = choose_recipe(auto, data_dir)
    assert outcome["study"] in why
    if rec.variant is None:  # no pretraining (or DINO) recommended: auto keeps the rule, and says why
        assert chosen.pretrain.variant == "auto" and "not a CASS recipe" in why
    else:
        assert chosen.pretrain.variant == rec.variant


@pytest.mark.slow
def test_study_report_renders_offline(study: dict, browser) -> None:  # noqa: F811 - the imported fixture
    page = browser.open(Path(study["outcome"]["report"]))
    assert not page.remote_requests and not page.errors
    assert page.count("table") >= 3
    assert len(page.loaded_images()) == 1  # the plot, inline
    text = page.page.inner_text("body")
    assert f"Recommended: {study['outcome']['recommended']}" in text and "seed-to-seed spread" in text


@pytest.mark.slow
def test_a_study_spreads_over_the_pools_workers(prefect_api: str, demo_root: Path, tmp_path: Path) -> None:
    """The study flow with group_deployment: a process worker of the pool runs one flow run per (method, seed)."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from flows.study import study_flow

    mapping = _mapping(tmp_path, demo_root)
    mapping["study"].update(fractions=[1.0], networks=["cnn"])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CASS_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=prefect_api, CASS_PROJECT_DIR=str(ROOT),
               PYTHONPATH=str(ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1")  # the worker asks for runs every second (default: 10 s idle)
    prefect = str(Path(sys.executable).parent / "prefect")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="cass-process", type="process"), overwrite=True)
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--name", "study-group"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "cass-process", "--name", "study-worker"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        outcome = study_flow(str(params_file), [], str(tmp_path / "outputs"), True, "cass-study-group/study-group",
                             timeout_s=900)
    finally:
        stop_group(worker, timeout=60)
    assert len(outcome["ran"]) == 4 and not outcome["skipped"]  # 2 methods x 2 seeds x 1 fraction x 1 network
    with get_client(sync_client=True) as client:
        group = DeploymentFilter(name=DeploymentFilterName(any_=["study-group"]))
        runs = client.read_flow_runs(deployment_filter=group)
    ours = [r for r in runs if outcome["study"] in r.name]
    assert len(ours) == 4 and all(r.state.is_completed() for r in ours), [(r.name, r.state.name) for r in ours]
    mlflow.set_tracking_uri(mapping["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    parent = client.get_run(outcome["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["study_cell"] for r in children if r.info.status == "FINISHED") == sorted(outcome["ran"])


def _rows(method: str, network: str, values: dict[int, float], fraction: float = 0.1, test: int = 400) -> list[dict]:
    return [{"method": method, "network": network, "label_fraction": fraction, "seed": s, "macro_f1": v,
             "test_images": test} for s, v in values.items()]


def test_the_rule_recommends_a_gain_larger_than_the_seed_spread_for_every_network() -> None:
    base = {1: 0.50, 2: 0.60, 3: 0.40}
    results = []
    for net in ("cnn", "vit"):
        results += _rows("no pretraining", net, base, test=400)
        results += _rows("CASS simsiam", net, {s: v + 0.10 + 0.01 * s for s, v in base.items()})  # steady gain
        results += _rows("CASS", net, {1: 0.70, 2: 0.45, 3: 0.38})  # mean gain +0.01, large spread
    pairs = stats.paired(results, "no pretraining")
    by = {(p.method, p.network): p for p in pairs}
    assert by[("CASS simsiam", "cnn")].passes and not by[("CASS", "cnn")].passes
    assert by[("CASS simsiam", "vit")].diffs == pytest.approx({1: 0.11, 2: 0.12, 3: 0.13})
    decision = stats.decide(pairs, methods=["no pretraining", "CASS", "CASS simsiam"], networks=["cnn", "vit"],
                            baseline="no pretraining", fraction=0.1, min_effect=0.02)
    assert decision.recommended == "CASS simsiam" and "seed-to-seed spread" in decision.reason
    # CASS's +0.01 is within what 400 test images resolve: the study says how many it would need.
    assert any(line.startswith("CASS vs no pretraining, cnn") and "test images" in line for line in decision.too_small)
    assert by[("CASS", "cnn")].images_needed(0.02) > 400

    # The gain for one network only: no recommendation over the baseline.
    one = [r for r in results if not (r["method"] == "CASS simsiam" and r["network"] == "vit")]
    one += _rows("CASS simsiam", "vit", {1: 0.49, 2: 0.61, 3: 0.40})
    decision = stats.decide(stats.paired(one, "no pretraining"), methods=["no pretraining", "CASS simsiam"],
                            networks=["cnn", "vit"], baseline="no pretraining", fraction=0.1, min_effect=0.02)
    assert decision.recommended == "no pretraining" and not decision.pretrains

    # One seed: no spread to compare with, so nothing is recommended over the baseline.
    single = [r for r in results if r["seed"] == 1]
    decision = stats.decide(stats.paired(single, "no pretraining"), methods=["no pretraining", "CASS simsiam"],
                            networks=["cnn", "vit"], baseline="no pretraining", fraction=0.1, min_effect=0.02)
    assert decision.recommended == "no pretraining" and "two or more" in decision.reason


def test_auto_follows_the_recommendation_recorded_for_this_data_only(tmp_path: Path, prepared_dir: Path,
                                                                      demo_root: Path) -> None:
    from cass.run_keys import data_hash

    mapping = tiny_mapping(demo_root)
    mapping["pretrain"]["variant"] = "auto"
    mapping["study"] = {"recommendations": str(tmp_path / "recs")}
    params = params_from_mapping(mapping)
    kept, why = choose_recipe(params, prepared_dir)
    assert kept is params and "no study recommendation" in why and "-> paper" in why

    rec = recommend.recommendation("CASS simsiam + vicreg", "it beat no pretraining", data_hash(prepared_dir),
                                   "abc123", None)
    fragment = recommend.write(params, rec, tmp_path / "report")
    assert yaml.safe_load(fragment.read_text()) == {
        "pretrain": {"method": "cass", "variant": "simsiam", "anti_collapse": "vicreg", "anti_collapse_weight": 1.0},
        "finetune": {"init": "cass"}}
    chosen, why = choose_recipe(params, prepared_dir)
    assert (chosen.pretrain.variant, chosen.pretrain.anti_collapse) == ("simsiam", "vicreg")
    assert "abc123" in why and "CASS simsiam + vicreg" in why
    # A pretraining is resumed and reused under the recipe auto resolves to, not under "auto".
    from cass.pretraining_common import pretrain_fingerprint

    assert pretrain_fingerprint(params, prepared_dir) == pretrain_fingerprint(chosen, prepared_dir)
    paper = params_from_mapping({**mapping, "pretrain": {**mapping["pretrain"], "variant": "paper"}})
    assert pretrain_fingerprint(params, prepared_dir) != pretrain_fingerprint(paper, prepared_dir)
    # Another data version has no recommendation; explicit variants are never changed.
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.csv").write_text((prepared_dir / "manifest.csv").read_text() + "\n")
    assert choose_recipe(params, other)[0].pretrain.variant == "auto"
    explicit = params_from_mapping({**mapping, "pretrain": {**mapping["pretrain"], "variant": "byol"}})
    assert choose_recipe(explicit, prepared_dir)[0].pretrain.variant == "byol"
    json.loads(recommend.record_file(params, rec.data_hash).read_text())  # the record is JSON


def test_unknown_method_or_fraction_fails_before_training(tmp_path: Path, prepared_dir: Path,
                                                          demo_root: Path) -> None:
    from cass.errors import ConfigError
    from cass.study.plan import make_plan

    mapping = tiny_mapping(demo_root)
    mapping["study"] = {"methods": ["no pretraining", "CASS typo"]}
    with pytest.raises(ConfigError, match="unknown method"):
        make_plan(params_from_mapping(mapping), prepared_dir, tmp_path)
    mapping["study"] = {"methods": ["no pretraining", "CASS"], "fractions": [0.1]}
    with pytest.raises(ConfigError, match=r"study.fractions \[0.1\] are not in split.label_fractions"):
        make_plan(params_from_mapping(mapping), prepared_dir, tmp_path)
    assert not (tmp_path / "study").exists()


def test_summary_and_model_card_name_the_recipe_and_why(tmp_path: Path) -> None:
    from cass.model_card import CardFacts, recipe_of, to_markdown
    from flows.report import MlflowLinks, RunSummary, pretraining_recipe, summary_markdown

    why = "pretrain.variant: auto -> CASS simsiam + vicreg, recommended by `cass study` abc123 for this data version"
    (tmp_path / "networks.json").write_text(json.dumps({"method": "cass", "variant": "simsiam", "views": 2,
                                                        "augment_recipe": "paper", "anti_collapse": "vicreg",
                                                        "variant_reason": why}))
    recipe = pretraining_recipe(tmp_path)
    assert recipe == {"recipe": "simsiam + vicreg", "recipe_reason": why}
    summary = RunSummary(dataset="demo", data_version="", data_hash="0" * 64, test_set="1" * 64, run_key="2" * 64,
                         label_fraction=0.1, links=MlflowLinks("sqlite:///mlflow.db", "1"), pipeline_run_id="p",
                         pretraining=("r", False), recipe=recipe)
    assert f"Pretraining recipe: simsiam + vicreg ({why})." in summary_markdown(summary)
    facts = CardFacts(name="cass-demo-cnn", version="1", network="cnn", tags={}, metrics={"macro_f1": 0.9},
                      settings={"finetune.init": "cass"},
                      pretraining={"method": "cass", **recipe_of(tmp_path / "networks.json")})
    card = to_markdown(facts)
    assert "| pretraining recipe | simsiam + vicreg |" in card and f"| why this recipe | {why} |" in card
    (tmp_path / "networks.json").write_text(json.dumps({"method": "dino"}))
    assert recipe_of(tmp_path / "networks.json") == {} and pretraining_recipe(None) == {}
