"""One model-gate verdict per version: the committed policy promotion applies, and the record the tag, the card
and the log are rendered from (cass.quality.policy). The registry side runs in tests/test_mlflow_local.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cass.config import QualityConfig, params_from_mapping
from cass.errors import ConfigError
from cass.model_card import _gate_section, _gate_word
from cass.quality.policy import GateVerdict, committed_policy, gate_thresholds


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _settings(path: Path, floor: float) -> None:
    path.write_text(yaml.safe_dump({"seed": 7, "quality": {"min_macro_f1": floor, "min_balanced_accuracy": 0.5}}))


def test_the_policy_is_the_committed_file_not_the_workspace_or_the_overrides(tmp_path: Path) -> None:
    # Guards: `dvc exp run -S quality.min_macro_f1=0.5` edits params.yaml in the workspace; the promotion
    # thresholds must stay those committed at HEAD.
    repo = tmp_path / "project"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    _settings(repo / "params.yaml", 0.6)
    _git("add", "params.yaml", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "settings", cwd=repo)
    _settings(repo / "params.yaml", 0.5)  # what `dvc exp run -S` leaves in the workspace
    lowered = params_from_mapping({"quality": {"min_macro_f1": 0.5}})
    policy = committed_policy(repo / "params.yaml", lowered)
    assert policy.quality.min_macro_f1 == 0.6 and policy.source.startswith("params.yaml at commit ")

    loose = tmp_path / "loose.yaml"  # outside any git repository: the file on disk, without --set overrides
    _settings(loose, 0.7)
    policy = committed_policy(loose, lowered)
    assert policy.quality.min_macro_f1 == 0.7 and policy.source.endswith("(not committed in git)")
    assert committed_policy(None, lowered).quality == lowered.quality  # a library call: the run's settings
    assert policy.quality.expected_metrics == lowered.quality.expected_metrics != "auto"  # resolved for the data

    (repo / "params.yaml").write_text(yaml.safe_dump({"quality": {"min_macro_f1": 2}}))
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "bad floor", cwd=repo)
    with pytest.raises(ConfigError, match=r"(?s)params.yaml at commit [0-9a-f]{12}: invalid settings.*"
                                          r"quality.min_macro_f1: Input should be less than or equal to 1"):
        committed_policy(repo / "params.yaml", lowered)


def test_a_verdict_that_passed_only_under_lowered_thresholds_says_so_everywhere() -> None:
    run, committed = QualityConfig(min_macro_f1=0.5), QualityConfig(min_macro_f1=0.6)
    policy = GateVerdict(False, ("FAIL macro_f1_floor (1 of 2 metrics rows): test macro F1 below 0.6",),
                         thresholds=gate_thresholds(committed), source="params.yaml at commit abc", checks=8)
    verdict = GateVerdict(True, thresholds=gate_thresholds(run), source="the run's settings", checks=8, policy=policy)
    assert verdict.lowered and not verdict.promotable
    text = verdict.text()
    assert text.startswith("passed only under lowered thresholds (quality.min_macro_f1 0.5 (policy 0.6))")
    assert "the committed policy (params.yaml at commit abc) fails it: FAIL macro_f1_floor" in text
    record = verdict.record()
    assert record["verdict"] == text and record["promotable"] is False and record["policy"]["passed"] is False
    assert GateVerdict.from_record(record).text() == text  # the record alone renders the same verdict
    card = "\n".join(_gate_section(record))
    assert f"Verdict: **{text}**" in card and "Under the committed policy: FAILED." in card
    assert "| quality.min_macro_f1 | 0.5 | 0.6 |" in card
    assert _gate_word(record) == "passed only under lowered thresholds (not promotable)"
    same = GateVerdict(True, thresholds=gate_thresholds(committed), source="the run's settings")
    assert same.text() == "passed" and same.promotable and _gate_word(same.record()) == "passed"
