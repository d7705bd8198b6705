"""The `cass` command line: help for every option, exit codes, and the demo end to end."""

from __future__ import annotations

import json
import os
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


@pytest.mark.slow
def test_demo_end_to_end_through_the_console_script(tmp_path: Path, demo_root: Path) -> None:
    # Two-epoch tiny networks score low: the model gate (which fails the retraining flow) only warns here.
    params = _write_params(tmp_path, demo_root, finetune={"epochs": 2}, pretrain={"monitor_every": 1},
                           quality=LENIENT_MODEL_GATE)
    exe = Path(sys.executable).parent / "cass"
    proc = subprocess.run([str(exe), "demo", "--params", str(params), "--outputs", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "macro F1" in proc.stdout
    # the kNN curve's start and end, one line per network, as pretraining recorded them
    pre = json.loads((tmp_path / "out" / "pretrain" / "metrics.json").read_text())
    for label, net in (("CNN", "cnn"), ("ViT", "vit")):
        curve = f"{label} {pre[f'{net}_knn_accuracy_start']:.3f} -> {pre[f'{net}_knn_accuracy']:.3f}"
        assert sum(curve in line for line in proc.stdout.splitlines()) == 1, proc.stdout
    for net in ("cnn", "vit"):
        metrics = json.loads((tmp_path / "out" / "evaluate" / net / "metrics.json").read_text())
        # the table the demo prints holds the figures evaluation wrote
        row = f"{net:8} {metrics['macro_f1']:9.3f} {metrics['balanced_accuracy']:9.3f} "
        assert sum(line.startswith(row) for line in proc.stdout.splitlines()) == 1, proc.stdout
        assert (tmp_path / "out" / "evaluate" / net / "confusion_matrix.png").is_file()


# --------------------------------------------------------------------------------------------------
# The parser: one handler per command, one --network


def _leaves(parser, name: str = ""):
    subs = list(_subparsers(parser))
    if not subs:
        yield name, parser
    for sub_name, sub in subs:
        yield from _leaves(sub, f"{name} {sub_name}".strip())


def test_every_command_runs_a_handler() -> None:
    for name, parser in _leaves(build_parser()):
        assert callable(parser.get_default("func")), f"`cass {name}` has no handler"


def test_network_choices_come_from_the_network_type() -> None:
    from cass.config import NETWORKS

    for name, parser in _leaves(build_parser()):
        network = next((a for a in parser._actions if "--network" in a.option_strings), None)
        if network is None:
            continue
        if name in ("promote", "rollback"):  # one registered model: no "both", no default
            assert (list(network.choices), network.default) == (list(NETWORKS), None), name
        else:
            assert (list(network.choices), network.default) == ([*NETWORKS, "both"], "both"), name
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["promote", "--network", "both"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------------------------------
# Settings read once: flags that set a setting are typed updates, validated like --set


def test_flag_that_sets_a_setting_is_rejected_like_set_naming_the_key(
    tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    params = _write_params(tmp_path, demo_root)
    common = ["tune", "--network", "cnn", "--params", str(params), "--outputs", str(tmp_path / "out")]
    assert main([*common, "--n-trials", "0"]) == 2
    by_flag = capsys.readouterr().err
    assert main([*common, "--set", "tune.n_trials=0"]) == 2
    by_set = capsys.readouterr().err
    line = "  - tune.n_trials: Input should be greater than or equal to 1 (got 0)"
    assert line in by_flag.splitlines() and line in by_set.splitlines()
    assert not (tmp_path / "out").exists()  # nothing ran


def test_setting_updates_apply_after_set_through_the_same_validation(tmp_path: Path, demo_root: Path) -> None:
    from cass.cli.settings import apply_updates, load_settings
    from cass.config import load_params
    from cass.errors import ConfigError

    params = _write_params(tmp_path, demo_root)
    got = load_settings(params, ["tune.n_trials=3", "pretrain.epochs=2"],
                        {"tune.n_trials": 4, "tune.timeout": 30.0, "pretrain.method": "dino"})
    expected = load_params(params, ["pretrain.epochs=2", "tune.n_trials=4", "tune.timeout=30.0",
                                    "pretrain.method=dino"])
    assert got == expected and got.tune.n_trials == 4 and got.pretrain.method == "dino"

    with pytest.raises(ConfigError, match=r"pretrain\.method: Input should be 'cass' or 'dino' \(got 'byol'\)"):
        load_settings(params, [], {"pretrain.method": "byol"})
    with pytest.raises(ConfigError, match=r"pretrain\.epoch: unknown key; did you mean 'epochs'\?"):
        load_settings(params, [], {"pretrain.epoch": 2})
    with pytest.raises(ConfigError, match="pretrain.epochs.x: 'epochs' is a value, not a section"):
        apply_updates({"pretrain": {"epochs": 1}}, {"pretrain.epochs.x": 1})
    raw = {"pretrain": {"epochs": 1}, "tune": {"n_trials": 2}}
    assert apply_updates(raw, {"pretrain.epochs": 5, "split.seed": 3}) == {
        "pretrain": {"epochs": 5}, "tune": {"n_trials": 2}, "split": {"seed": 3}}
    assert raw == {"pretrain": {"epochs": 1}, "tune": {"n_trials": 2}}  # the caller's mapping is left as it was


# --------------------------------------------------------------------------------------------------
# Light commands start without the heavy libraries

_IMPORTS = """
import sys
from cass.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sys.argv.pop(1).split(",")
print(code, *sorted(name for name in heavy if name in sys.modules))
"""
HEAVY = ("torch", "mlflow", "prefect", "optuna", "great_expectations")


def _heavy_imports(argv: list[str], cwd: Path, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _IMPORTS.replace("sys.argv[1:]", "sys.argv[2:]"), ",".join(heavy),
                           *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code, *heavy = proc.stdout.splitlines()[-1].split()
    assert code == "0", proc.stdout + proc.stderr
    return heavy


def test_light_commands_do_not_import_torch_mlflow_or_prefect(tmp_path: Path, demo_root: Path,
                                                              prepared_dir: Path) -> None:
    params = _write_params(tmp_path, demo_root)
    settings = ["--params", str(params), "--outputs", str(prepared_dir.parent)]
    for argv in (["--help"], ["data", "show", *settings], ["data", "verify", "--help"], ["promote", "--help"],
                 ["demo", "--help"]):
        assert _heavy_imports(argv, tmp_path) == [], argv
    assert _heavy_imports(["models", "test_vit"], tmp_path) == ["torch"]  # timm's registry needs torch, no more
    proc = subprocess.run([sys.executable, "-m", "cass.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: cass" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cass", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: cass" in proc.stdout


def test_data_show_reads_the_manifest_without_pandas_numpy_or_pillow(tmp_path: Path, demo_root: Path,
                                                                     prepared_dir: Path) -> None:
    """`cass data show` is a glance at a file: it loads the settings and nothing of the data stack."""
    params = _write_params(tmp_path, demo_root)
    argv = ["data", "show", "--params", str(params), "--outputs", str(prepared_dir.parent)]
    assert _heavy_imports(argv, tmp_path, ("pandas", "numpy", "PIL", *HEAVY)) == []
    proc = subprocess.run([sys.executable, "-m", "cass", *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"dataset demo: 64 images, 4 classes, single-label, root {demo_root}"
    table = [line.split() for line in lines[2:]]  # the same counts as the manifest, read with pandas here
    from cass.data.manifest import read_manifest

    df, _ = read_manifest(prepared_dir)
    counts = df.groupby(["labels", "split"]).size()
    assert table[0] == ["class", "train", "val", "test", "total"]
    for name, *numbers in table[1:]:
        assert [int(n) for n in numbers] == [*(int(counts[name, s]) for s in ("train", "val", "test")),
                                             int((df["labels"] == name).sum())], name


_DOWNLOAD = """
import sys
from cass.cli import main
import mlflow
code = main(sys.argv[3:])
mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path=sys.argv[2])
print(code)
"""


def test_a_command_that_downloads_from_mlflow_draws_no_progress_bars(tmp_path: Path, demo_root: Path,
                                                                     prepared_dir: Path) -> None:
    """`cass promote` and `cass predict` download model files: in a command's process MLflow's "Downloading
    artifacts" bars are off (they filled the output), unless the user turned them on."""
    artifacts = tmp_path / "artifacts"
    for i in range(3):
        (artifacts / f"part{i}.txt").parent.mkdir(exist_ok=True)
        (artifacts / f"part{i}.txt").write_text(str(i))
    params = _write_params(tmp_path, demo_root)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}

    def download(env: dict[str, str]) -> subprocess.CompletedProcess:
        argv = ["data", "show", "--params", str(params), "--outputs", str(prepared_dir.parent)]
        return subprocess.run([sys.executable, "-c", _DOWNLOAD, artifacts.as_uri(), str(tmp_path / "copy"), *argv],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    proc = download(env)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "0", proc.stderr
    assert (tmp_path / "copy" / "artifacts" / "part2.txt").read_text() == "2"
    assert "Downloading artifacts" not in proc.stderr, proc.stderr
    turned_on = download({**env, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"})  # the user's choice stands
    assert "Downloading artifacts" in turned_on.stderr, turned_on.stderr


# --------------------------------------------------------------------------------------------------
# The demo's temporary Prefect server


def test_demo_waits_for_its_prefect_server_unless_told_how_long(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.demo import STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_SETTING, prefect_environment

    environ: dict[str, str] = {}
    prefect_environment(quiet=True, environ=environ)
    assert environ[STARTUP_TIMEOUT_SETTING] == str(STARTUP_TIMEOUT_S) == "600"
    assert environ["PREFECT_HOME"].endswith(".prefect") and environ["PREFECT_LOGGING_LEVEL"] == "WARNING"
    environ = {STARTUP_TIMEOUT_SETTING: "45"}
    prefect_environment(quiet=False, environ=environ)
    assert environ[STARTUP_TIMEOUT_SETTING] == "45" and "PREFECT_LOGGING_LEVEL" not in environ
    environ = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}  # a real server: nothing temporary to wait for
    prefect_environment(quiet=False, environ=environ)
    assert STARTUP_TIMEOUT_SETTING not in environ and "PREFECT_HOME" not in environ

    # The name is the one Prefect reads (a renamed setting would be ignored silently).
    from prefect.settings import Settings

    monkeypatch.setenv(STARTUP_TIMEOUT_SETTING, "600")
    assert Settings().server.ephemeral.startup_timeout_seconds == 600


def test_demo_says_what_to_do_when_its_prefect_server_never_answers(tmp_path: Path, demo_root: Path) -> None:
    params = _write_params(tmp_path, demo_root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    exe = Path(sys.executable).parent / "cass"
    proc = subprocess.run([str(exe), "demo", "--params", str(params), "--outputs", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "error: the temporary local Prefect server did not answer within 0 s" in proc.stderr, proc.stderr
    assert "PREFECT_API_URL=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "pretrain").exists()


@pytest.mark.parametrize(("command", "says"), [
    ("finetune", "resume after the last finished epoch"),
    ("pretrain", "resume after the last finished epoch"),
    ("evaluate", "outputs on disk are the previous complete ones"),
])
def test_ctrl_c_promises_a_resume_only_where_the_command_has_one(command: str, says: str, tmp_path: Path,
                                                                 demo_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from cass.cli.commands import train

    def interrupted(_args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, command, interrupted)
    params = _write_params(tmp_path, demo_root)
    assert main([command, "--params", str(params), "--outputs", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert says in err and (command != "evaluate" or "resume" not in err)
