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
from cass.layout import Layout, best_params_path
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
