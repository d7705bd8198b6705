"""Batched inference and `cass predict` at volume, on a saved classifier folder (no MLflow needed): batched
and one-by-one probabilities agree, a bad image is listed and skipped, an interrupted run resumes where it
stopped, and wrong options are refused before torch or MLflow load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_mapping
from test_cli import _IMPORTS, HEAVY

from cass.cli import main

CLASSES = ("adipose", "lymphocytes", "stroma", "tumor")
ROOT = Path(__file__).resolve().parents[1]

# Batched and one-by-one logits differ only by float32 rounding: a batched kernel sums the same products in
# another order. Measured on test_resnet/test_vit: at most 2.3e-7 (about 8 ulps of the logits' magnitude).
# We allow 1e-6 for the logits (other kernels, other CPUs). Softmax moves each probability by at most half
# the largest logit change (its Jacobian's infinity-norm is max 2p(1-p) <= 1/2), sigmoid by a quarter, and
# the logits are divided by the temperature first, so |dp| <= 1e-6 / (2 T). At the smallest temperature
# calibration can fit (0.05, cass.calibration.TEMPERATURE_RANGE) that is 1e-5: the tolerance, tested at T=0.05.
LOGIT_ROUNDING = 1e-6
MIN_TEMPERATURE = 0.05
PROB_ATOL = LOGIT_ROUNDING / (2 * MIN_TEMPERATURE)


def _classifier(folder: Path, arch: str, temperature: float, multilabel: bool = False) -> Path:
    import torch

    from cass.classifier import ClassifierSpec
    from cass.training import save_weights

    torch.manual_seed(3)
    spec = ClassifierSpec("cnn" if "resnet" in arch else "vit", arch, 32, CLASSES, multilabel, (0.5,) * 3, (0.25,) * 3,
                          temperature=temperature, thresholds=(0.3, 0.4, 0.5, 0.6) if multilabel else None)
    folder.mkdir(parents=True)
    save_weights(spec.build(), folder / "model.safetensors")
    (folder / "model.json").write_text(spec.to_json())
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _classifier(tmp_path_factory.mktemp("predict") / "cnn", "test_resnet", MIN_TEMPERATURE)


@pytest.fixture(scope="module")
def params_file(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("predict-settings") / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_mapping(demo_root)))
    return path


def _images(demo_root: Path) -> list[Path]:
    return sorted(demo_root.rglob("*.png"))


@pytest.mark.parametrize(("arch", "multilabel"), [("test_resnet", False), ("test_vit", True)])
def test_batched_probabilities_agree_with_one_by_one(arch: str, multilabel: bool, demo_root: Path,
                                                     tmp_path: Path) -> None:
    from cass.serving import ImageClassifier

    served = ImageClassifier()
    served.load(_classifier(tmp_path / arch, arch, MIN_TEMPERATURE, multilabel))
    calls: list[int] = []
    served.model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    frame = pd.DataFrame({"image": [p.read_bytes() for p in _images(demo_root)]})  # 64 images

    batched = served.predict(None, frame, {"batch_size": 24})
    assert calls == [24, 24, 16]  # batches, not one image per forward pass
    calls.clear()
    one_by_one = served.predict(None, frame, {"batch_size": 1})
    assert calls == [1] * len(frame)
    columns = list(CLASSES)
    diff = np.abs(batched[columns].to_numpy() - one_by_one[columns].to_numpy())
    assert diff.max() <= PROB_ATOL, diff.max()
    if multilabel:  # the thresholds apply as before: a label differs only for a probability within PROB_ATOL of its cut
        near = (np.abs(one_by_one[columns].to_numpy() - np.array([0.3, 0.4, 0.5, 0.6])) <= PROB_ATOL).any(axis=1)
        assert (batched["labels"] == one_by_one["labels"])[~near].all()


def test_a_bad_image_in_the_middle_of_a_folder_is_listed_and_skipped(model_dir: Path, params_file: Path,
                                                                      demo_root: Path, tmp_path: Path,
                                                                      capsys) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, path in enumerate(_images(demo_root)[:10]):
        shutil.copy(path, folder / f"{i:02d}.png")
    (folder / "05b.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")  # sorts between 05 and 06
    out = tmp_path / "pred.parquet"
    code = main(["predict", "--model", str(model_dir), str(folder), "--output", str(out), "--batch-size", "4",
                 "--workers", "1", "--chunk-size", "3", "--params", str(params_file)])
    assert code == 3
    err = capsys.readouterr().err
    assert f"{folder / '05b.png'}: " in err and "skipped" in err
    table = pd.read_parquet(out)
    assert table["path"].tolist() == [str(folder / f"{i:02d}.png") for i in range(10)]  # all others, in order
    assert list(table.columns) == ["path", "prediction", *CLASSES, "model_name", "model_version", "model_uri",
                                   "predicted_at"]
    assert set(table["prediction"]) <= set(CLASSES) and (table["model_uri"] == str(model_dir)).all()
    np.testing.assert_allclose(table[list(CLASSES)].sum(axis=1), 1.0, atol=1e-5)
    skipped = pd.read_csv(tmp_path / "pred.skipped.csv")
    assert skipped["path"].tolist() == [str(folder / "05b.png")] and "not an image" in skipped["problem"][0]
    assert not (tmp_path / "pred.parquet.parts").exists()


@pytest.mark.slow  # two `cass predict` processes: about 40 s on a busy 2-core machine
def test_an_interrupted_run_resumes_where_it_stopped(model_dir: Path, params_file: Path, demo_root: Path,
                                                     tmp_path: Path) -> None:
    """A named pipe among the inputs blocks the run at image 10 (reading it waits for a writer): the run is
    killed there, as a power cut would, after two parts of 4 images are on disk."""
    images = [str(p) for p in _images(demo_root)[:16]]
    pipe = tmp_path / "slow.png"
    os.mkfifo(pipe)
    listed = tmp_path / "inputs.csv"
    pd.DataFrame({"path": [*images[:10], str(pipe), *images[10:]]}).to_csv(listed, index=False)
    out = tmp_path / "pred.csv"
    argv = [sys.executable, "-m", "cass", "predict", "--model", str(model_dir), "--csv", str(listed), "--output",
            str(out), "--batch-size", "2", "--workers", "0", "--chunk-size", "4", "--params", str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = tmp_path / "pred.csv.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.csv"))) < 2:
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "no parts written"
        time.sleep(0.05)
    time.sleep(0.5)
    assert first.poll() is None  # still waiting on the pipe
    first.kill()
    first.wait(timeout=30)
    assert not out.exists()
    done_before = pd.concat([pd.read_csv(p) for p in sorted(parts.glob("part-*.csv"))])
    assert done_before["path"].tolist() == images[:8]

    pipe.unlink()
    shutil.copy(images[0], pipe)  # the file is back as an image
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "8 of 17 images done before" in second.stderr
    table = pd.read_csv(out)
    assert table["path"].tolist() == [*images[:10], str(pipe), *images[10:]]
    resumed = table.set_index("path").loc[images[:8]]
    assert resumed["predicted_at"].tolist() == done_before["predicted_at"].tolist()  # kept, not predicted again
    assert not parts.exists()


def _imports_after(argv: list[str], cwd: Path) -> tuple[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _IMPORTS.replace("sys.argv[1:]", "sys.argv[2:]"), ",".join(HEAVY),
                           *argv], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    code, *heavy = proc.stdout.splitlines()[-1].split()
    return code, heavy


def test_wrong_options_and_inputs_are_refused_before_torch_or_mlflow_load(model_dir: Path, params_file: Path,
                                                                          demo_root: Path, tmp_path: Path) -> None:
    image = str(_images(demo_root)[0])
    no_path = tmp_path / "list.csv"
    no_path.write_text("file\na.png\n")
    settings = ["--params", str(params_file)]
    for argv, code in (
        (["--model", str(model_dir), image, "--output", str(tmp_path / "p.txt")], "2"),  # not .csv/.parquet
        (["--model", str(model_dir), image, "--batch-size", "0"], "2"),
        (["--model", "cass-demo-cnn@champion", image], "2"),  # neither a folder nor a URI
        (["--model", str(model_dir), str(tmp_path / "missing")], "3"),
        (["--model", str(model_dir), str(tmp_path / "*.png")], "3"),  # a glob that matches nothing
        (["--model", str(model_dir), "--csv", str(no_path)], "3"),
        (["--model", str(model_dir), image, "--output", str(tmp_path / "nowhere" / "p.csv")], "2"),
    ):
        assert _imports_after(["predict", *argv, *settings], tmp_path) == (code, []), argv
