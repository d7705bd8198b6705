"""Each training stage has one entry point (cass.stages) that every caller runs with a tracker.

The untracked pipeline tunes with the no-op tracker (nothing logged, no MLflow run id anywhere), and the
rules that decide what a stage reads are written once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import yaml

from cass.config import params_from_mapping
from cass.outputs import Layout, best_params_path
from cass.pipeline import PipelineRun, plan, run_pipeline
from cass.stages import pretrain_dir, tunes
from cass.tuning import PARENT_RUN_ATTR, RUN_ATTR
from tests.conftest import tiny_mapping

REPO = Path(__file__).resolve().parents[1]


def test_no_tracked_twin_of_any_stage_and_no_tracked_branch_inside_the_stages() -> None:
    # Guards: each stage existed three ways (plain, tracked_* in cass.tracking, a CLI handler re-deriving its
    # inputs) and the pipeline's stages branched on run.tracked.
    sources = {p: p.read_text() for p in (REPO / "cass").rglob("*.py")}
    twins = r"^def tracked_(pretrain|tune|finetune|evaluate)\b"
    assert [str(p) for p, text in sources.items() if re.search(twins, text, re.M)] == []
    stages = (REPO / "cass" / "stages.py").read_text()
    pipeline = (REPO / "cass" / "pipeline.py").read_text()
    assert not re.search(r"\bif .*tracked", stages)
    assert not re.search(r"^\s+if (run\.)?tracked\b", pipeline, re.M)
    # "finetune.init == cass reads the pretraining folder" is one rule, in cass.stages.
    callers = [REPO / "cass" / "pipeline.py", *(REPO / "cass" / "cli").rglob("*.py"),
               *(REPO / "cass" / "tracking").rglob("*.py"), *(REPO / "cass" / "tuning").rglob("*.py"),
               *(REPO / "flows").rglob("*.py")]
    assert [str(p.relative_to(REPO)) for p in callers if 'init == "cass"' in p.read_text()] == []
    assert stages.count('init == "cass"') == 1


def test_the_pretraining_folder_and_the_tuning_rule(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    cass_init = params_from_mapping({})
    random_init = params_from_mapping({"finetune": {"init": "random"}})
    assert pretrain_dir(cass_init, layout) == layout.pretrain and pretrain_dir(random_init, layout) is None
    assert "pretrain" not in [s.name for s in plan(PipelineRun(random_init))]
    off = params_from_mapping({"tune": {"enabled": False}})
    assert tunes(cass_init) and not tunes(off)
    assert tunes(off, 3) and not tunes(cass_init, 0)  # --tune-trials N / 0 decides for one run


def test_untracked_pipeline_tunes_with_the_no_op_tracker(demo_root: Path, tmp_path: Path) -> None:
    mapping = tiny_mapping(demo_root)
    mapping["finetune"].update(networks=["cnn"], epochs=1)
    mapping["tune"] = {"n_trials": 2, "epochs": 1, "startup_trials": 1, "pruner": {"type": "none"},
                       "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    layout = Layout(tmp_path / "outputs")
    metrics = run_pipeline(params_from_mapping(mapping), layout, progress=False, tuning=True)

    assert 0.0 <= metrics["cnn"]["macro_f1"] <= 1.0
    best = yaml.safe_load(best_params_path(layout.tune, "cnn").read_text())
    lineage = json.loads((layout.finetune("cnn") / "lineage.json").read_text())
    assert lineage["tuning"]["trial"] == best["trial"]  # fine-tuning took the tuned settings
    assert lineage["settings"]["finetune"]["lr"] == best["finetune"]["lr"]
    (db,) = layout.tune.glob("optuna_cnn.db")
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 2 and PARENT_RUN_ATTR not in study.user_attrs  # no MLflow run, none to name
    assert all(RUN_ATTR not in t.user_attrs for t in study.trials)


# --------------------------------------------------------------------------------------------------
# dvc.yaml: generated from the stage list and the settings


def test_committed_dvc_yaml_is_the_one_the_stage_list_and_params_yaml_give() -> None:
    # Guards: dvc.yaml was written by hand and ran another pipeline than STAGES (always pretraining and tuning).
    from cass.config import load_params
    from cass.dvc_yaml import render

    assert (REPO / "dvc.yaml").read_text() == render(load_params(REPO / "params.yaml")), (
        "dvc.yaml is stale: run `cass dvc-yaml` and commit it")


def test_dvc_yaml_runs_the_stages_the_flow_runs_for_the_settings() -> None:
    from cass.dvc_yaml import Plan, render

    default = params_from_mapping({})
    names = [s.dvc for s in plan(PipelineRun(default, tuning=tunes(default))) if s.dvc]
    assert list(Plan.of(default).names) == names == ["prepare", "validate_data", "pretrain", "tune", "finetune",
                                                     "evaluate", "model_gate"]
    doc = yaml.safe_load(render(default))
    finetune = doc["stages"]["finetune"]["do"]
    assert finetune["cmd"].endswith("--best-params outputs/tune/best_${item}.yaml")
    assert "outputs/pretrain/${item}.safetensors" in finetune["deps"]

    # Random initialisation, never tuned, one network: no pretrain or tune stage, nothing read from them.
    plain = params_from_mapping({"finetune": {"init": "random", "networks": ["vit"]}, "tune": {"enabled": False}})
    doc = yaml.safe_load(render(plain))
    assert list(doc["stages"]) == ["prepare", "validate_data", "finetune", "evaluate", "model_gate"]
    finetune = doc["stages"]["finetune"]
    assert finetune["foreach"] == ["vit"] and finetune["do"]["cmd"] == "cass finetune --network ${item}"
    assert not [d for d in finetune["do"]["deps"] if d.startswith(("outputs/tune", "outputs/pretrain"))]
    assert not [p for p in doc["plots"] if "pretrain" in str(p) or "/cnn/" in str(p)]


def test_a_dvc_stage_refuses_a_stale_dvc_yaml_naming_the_command(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from cass.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tune": {"enabled": False}}))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())  # made for tune.enabled: true
    monkeypatch.chdir(tmp_path)
    assert main(["dvc-yaml", "--check"]) == 2
    assert "stages the settings do not run: tune" in capsys.readouterr().err

    monkeypatch.setenv("DVC_STAGE", "finetune@cnn")
    assert main(["finetune", "--network", "cnn", "-q"]) == 2
    err = capsys.readouterr().err
    assert "DVC stage finetune@cnn" in err and "Run `cass dvc-yaml`" in err
    assert not (tmp_path / "outputs").exists()  # refused before anything was read or written

    monkeypatch.delenv("DVC_STAGE")
    assert main(["dvc-yaml"]) == 0
    assert main(["dvc-yaml", "--check"]) == 0
    assert "tune" not in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
