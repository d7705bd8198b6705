"""The stage list and its runner, without training: the order and numbering every caller shows, what each
stage hands the next, the early stop of an unchanged run, and what a failed model gate stops.

The flow (tests/test_flows.py) and the tracked pipeline (tests/test_mlflow_*.py) run the same list end to
end; these tests pin the runner's rules with a recording executor instead of the stage functions.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from cass.config import params_from_mapping
from cass.outputs import Layout
from cass.pipeline import (
    STAGES,
    ModelGateFailed,
    PipelineRun,
    Stage,
    gate_failure,
    model_gate,
    plan,
    progress_lines,
    run_stages,
)
from cass.registry import PromotionResult

# Class b is never recognised: the default model gate fails (class_recall_nonzero).
FAILING_METRICS = {"macro_f1": 0.8, "balanced_accuracy": 0.8, "macro_auroc": 0.9, "accuracy": 0.8, "num_samples": 10,
                   "per_class": {"a": {"recall": 0.9, "support": 5}, "b": {"recall": 0.0, "support": 5}}}


class Recorder:
    """An executor that runs nothing: it records each call and returns ``answers[stage]`` per network."""

    def __init__(self, answers: dict[str, object] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, tuple]] = []
        self.lines: list[str] = []

    def __call__(self, stage: Stage, run: PipelineRun, networks, started) -> list:
        self.calls.append((stage.name, tuple(networks)))
        for network in networks:
            started(network)
        return [self.answers.get(stage.name, f"{stage.name}:{network}") for network in networks]


def test_every_caller_numbers_the_same_declared_stages() -> None:
    params = params_from_mapping({})
    assert progress_lines(PipelineRun(params)) == [
        "[1/8] prepare", "[2/8] data gate", "[3/8] pretrain", "[4/8] fine-tune cnn", "[5/8] fine-tune vit",
        "[6/8] evaluate cnn", "[7/8] evaluate vit", "[8/8] model gate",
    ]
    tracked = PipelineRun(params, tracked=True, tuning=True, data_version="v1")
    assert [line.split("] ")[1] for line in progress_lines(tracked)] == [
        "dvc pull", "prepare", "data gate", "pretrain", "tune cnn", "tune vit", "fine-tune cnn", "fine-tune vit",
        "evaluate cnn", "evaluate vit", "model gate", "register cnn", "register vit", "promote cnn", "promote vit",
    ]
    # Without CASS pretraining there is no pretrain stage; bookkeeping steps are in the plan, not the lines.
    random_init = params_from_mapping({"finetune": {"init": "random", "networks": ["vit"]}})
    names = [stage.name for stage in plan(PipelineRun(random_init, tracked=True))]
    assert "pretrain" not in names and names[0] == "check MLflow" and names[-1] == "finish MLflow run"
    # Only I/O is retried: a training stage or a gate that failed for a real reason would only fail again.
    assert [s.name for s in STAGES if not s.io] == ["prepare", "data gate", "pretrain", "tune", "fine-tune",
                                                    "evaluate", "model gate"]


def test_runner_hands_each_stage_what_the_earlier_ones_returned() -> None:
    recorder, lines = Recorder({"prepare": "key-1", "start MLflow run": "run-1"}), []
    done = run_stages(PipelineRun(params_from_mapping({}), tracked=True, force=True), recorder, lines.append)
    assert done.run_key == "key-1" and done.run_id == "run-1"
    assert done.finetuned == {"cnn": "fine-tune:cnn", "vit": "fine-tune:vit"}
    assert done.versions == {"cnn": "register:cnn", "vit": "register:vit"}
    # Fine-tuning may run both networks at once; every other per-network stage gets one at a time.
    assert ("fine-tune", ("cnn", "vit")) in recorder.calls and ("evaluate", ("cnn",)) in recorder.calls
    assert "find an unchanged run" not in [name for name, _ in recorder.calls]  # force: always trains
    assert lines == progress_lines(PipelineRun(params_from_mapping({}), tracked=True, force=True))


def test_an_unchanged_run_stops_before_anything_is_trained() -> None:
    recorder = Recorder({"find an unchanged run": "earlier-run"})
    done = run_stages(PipelineRun(params_from_mapping({}), tracked=True), recorder)
    assert done.earlier_run_id == "earlier-run" and done.run_id is None
    assert [name for name, _ in recorder.calls] == ["check MLflow", "prepare", "find an unchanged run"]


def test_an_untracked_run_may_tune() -> None:
    # Guards: tuning was hard-wired to MLflow, and the untracked pipeline refused it.
    recorder = Recorder({"prepare": "key-1"})
    done = run_stages(PipelineRun(params_from_mapping({}), tuning=True), recorder)
    assert ("tune", ("cnn",)) in recorder.calls and ("tune", ("vit",)) in recorder.calls
    assert done.best_params == {"cnn": "tune:cnn", "vit": "tune:vit"} and done.run_id is None


def test_failed_model_gate_stops_registration_but_only_warns_when_nothing_is_registered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout, params = Layout(tmp_path), params_from_mapping({})
    for network in ("cnn", "vit"):
        layout.evaluate(network).mkdir(parents=True)
        layout.evaluate_metrics(network).write_text(json.dumps(FAILING_METRICS))
    result = model_gate(params, layout, "cnn")
    assert not result.success and (layout.quality("model") / "cnn").is_dir()  # the report goes to the layout
    gate = next(stage for stage in STAGES if stage.name == "model gate")

    with pytest.raises(ModelGateFailed, match="nothing was registered") as raised:
        gate.run(PipelineRun(params, layout, tracked=True), None)
    assert [network for network, _ in raised.value.failed] == ["cnn", "vit"]
    # A subclass inherits GateFailed's exit code; what the caller sees is 5, the documented code of a failed gate
    # (`cass --help`), and the result it carries is a failed network's, not a data gate's.
    assert raised.value.exit_code == 5 and raised.value.result is raised.value.failed[0][1]
    copy = pickle.loads(pickle.dumps(raised.value))  # results may cross a process or a result store
    assert [network for network, _ in copy.failed] == ["cnn", "vit"]
    assert copy.result.summary() == raised.value.result.summary() and str(copy) == str(raised.value)

    with caplog.at_level(logging.WARNING, logger="cass.pipeline"):
        gate.run(PipelineRun(params, layout), None)  # untracked: the demo registers nothing
        gate.run(PipelineRun(params, layout, tracked=True, register=False), None)
    assert sum("class_recall_nonzero" in r.getMessage() for r in caplog.records) >= 2


PASSING_METRICS = {**FAILING_METRICS,
                   "per_class": {"a": {"recall": 0.9, "support": 5}, "b": {"recall": 0.7, "support": 5}}}


class GatingRecorder(Recorder):
    """A :class:`Recorder` that runs the real model gate stage on the metrics files of the layout."""

    def __call__(self, stage: Stage, run: PipelineRun, networks, started) -> list:
        if stage.name == "model gate":
            self.calls.append((stage.name, tuple(networks)))
            started(None)
            return [stage.run(run, None)]
        return super().__call__(stage, run, networks, started)


def _cnn_passes_vit_fails(layout: Layout) -> None:
    for network, metrics in (("cnn", PASSING_METRICS), ("vit", FAILING_METRICS)):
        layout.evaluate(network).mkdir(parents=True)
        layout.evaluate_metrics(network).write_text(json.dumps(metrics))


def test_a_network_that_passes_the_model_gate_is_registered_and_promoted_on_its_own(tmp_path: Path) -> None:
    # Guards: with the docs' on-demand example the CNN passed (0.908) and the ViT failed (0.418), and nothing
    # was registered: one network's failure kept the other out of the registry.
    layout = Layout(tmp_path)
    _cnn_passes_vit_fails(layout)
    promoted = PromotionResult("cass-demo-cnn", "3", True, "3", None, "first champion")
    recorder, lines = GatingRecorder({"prepare": "key-1", "start MLflow run": "run-1", "register": "3",
                                      "promote": promoted}), []
    done = run_stages(PipelineRun(params_from_mapping({}), layout, tracked=True, force=True), recorder, lines.append)

    assert done.versions == {"cnn": "3"} and done.promotions == {"cnn": promoted}
    assert ("register", ("cnn",)) in recorder.calls and ("register", ("vit",)) not in recorder.calls
    assert ("promote", ("vit",)) not in recorder.calls
    assert "finish MLflow run" in [name for name, _ in recorder.calls]  # the run ends normally ...
    assert set(done.gate_failures) == {"vit"}
    assert lines[-5:] == ["[8/12] model gate", "[9/12] register cnn",
                          "[10/12] register vit: skipped, vit failed the model gate", "[11/12] promote cnn",
                          "[12/12] promote vit: skipped, vit failed the model gate"]
    failure = gate_failure(done)  # ... and its callers report the failed network, naming what passed
    assert isinstance(failure, ModelGateFailed) and failure.exit_code == 5 and failure.result is failure.failed[0][1]
    text = str(failure)
    assert "vit: not registered or promoted" in text and "class_recall_nonzero" in text
    assert "cnn: passed the model gate, registered as version 3; cass-demo-cnn v3: promoted to champion" in text
    assert [network for network, _ in failure.failed] == ["vit"]


def test_all_policy_registers_nothing_unless_every_network_passes(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _cnn_passes_vit_fails(layout)
    recorder = GatingRecorder({"prepare": "key-1", "start MLflow run": "run-1"})
    params = params_from_mapping({"quality": {"model_gate_policy": "all"}})
    with pytest.raises(ModelGateFailed, match="nothing was registered or promoted") as raised:
        run_stages(PipelineRun(params, layout, tracked=True, force=True), recorder)
    assert "cnn passed, but quality.model_gate_policy is 'all'" in str(raised.value)
    assert not [name for name, _ in recorder.calls if name in ("register", "promote")]
