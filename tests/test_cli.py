"""The `cass` command line: help for every option, exit codes, and the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cass.cli import build_parser, main
from tests.conftest import LENIENT_MODEL_GATE, tiny_mapping


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            yield from action.choices.items()


def test_every_option_has_help() -> None:
    def check(parser, name):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"`cass {name}` option {action.option_strings} has no help"
        for sub_name, sub in _subparsers(parser):
            assert sub.description, f"`cass {name} {sub_name}` has no description"
            check(sub, f"{name} {sub_name}".strip())

    check(build_parser(), "")


def test_help_runs_for_every_command(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--help"], ["pretrain", "--help"], ["data", "prepare", "--help"], ["finetune", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--set KEY=VALUE" in capsys.readouterr().out


def _write_params(tmp_path: Path, demo_root: Path, **sections) -> Path:
    raw = tiny_mapping(demo_root)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_typo_in_params_exits_non_zero_naming_the_key(tmp_path: Path, demo_root: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    params = _write_params(tmp_path, demo_root, pretrain={"epoch": 2})
    code = main(["pretrain", "--params", str(params), "--outputs", str(tmp_path / "out")])
    assert code == 2
    assert "pretrain.epoch: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_override_exits_non_zero(tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture) -> None:
    params = _write_params(tmp_path, demo_root)
    assert main(["data", "prepare", "--params", str(params), "--set", "split.test=2"]) == 2
    assert "split.test" in capsys.readouterr().err


def test_unknown_model_lists_choices(tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture) -> None:
    params = _write_params(tmp_path, demo_root)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--params", str(params), "--outputs", str(out), "-q"]) == 0
    code = main(["pretrain", "--params", str(params), "--outputs", str(out), "-q", "--set", "model.cnn=resnet5O"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'resnet5O'" in err and "resnet50" in err


def test_demo_end_to_end_through_the_console_script(tmp_path: Path, demo_root: Path) -> None:
    # Two-epoch tiny networks score low: the model gate (which fails the retraining flow) only warns here.
    params = _write_params(tmp_path, demo_root, finetune={"epochs": 2},
                           quality=LENIENT_MODEL_GATE)
    exe = Path(sys.executable).parent / "cass"
    proc = subprocess.run([str(exe), "demo", "--params", str(params), "--outputs", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "macro F1" in proc.stdout
    for net in ("cnn", "vit"):
        metrics = json.loads((tmp_path / "out" / "evaluate" / net / "metrics.json").read_text())
        assert 0.0 <= metrics["macro_f1"] <= 1.0
        assert (tmp_path / "out" / "evaluate" / net / "confusion_matrix.png").is_file()
