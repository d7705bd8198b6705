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
    assert sorted(calls, reverse=True) == [24, 24, 16]  # batches, not one image per forward pass (lanes: any order)
    calls.clear()
    one_by_one = served.predict(None, frame, {"batch_size": 1})
    assert calls == [1] * len(frame)
    columns = list(CLASSES)
    diff = np.abs(batched[columns].to_numpy() - one_by_one[columns].to_numpy())
    assert diff.max() <= PROB_ATOL, diff.max()
    in_lanes = served.predict(None, frame, {"batch_size": 8, "lanes": 3})  # 8 batches, 3 at a time, a thread each
    assert np.abs(in_lanes[columns].to_numpy() - one_by_one[columns].to_numpy()).max() <= PROB_ATOL
    if multilabel:  # the thresholds apply as before: a label differs only for a probability within PROB_ATOL of its cut
        near = (np.abs(one_by_one[columns].to_numpy() - np.array([0.3, 0.4, 0.5, 0.6])) <= PROB_ATOL).any(axis=1)
        assert (batched["labels"] == one_by_one["labels"])[~near].all()



def test_batched_preprocessing_equals_the_evaluation_transform_image_by_image() -> None:
    """Prediction resizes and normalises a whole batch at once; evaluation (cass evaluate, fine-tuning's
    validation) runs eval_transform on one image at a time. Same kernels, same order: equal bit for bit (a
    tolerance of 0), for images of the model's size and of others (resized, non-square, upscaled), and for
    modes converted to RGB first (grayscale, 16-bit, transparent)."""
    import torch
    from PIL import Image

    from cass.config import AugmentConfig
    from cass.data.images import to_rgb8
    from cass.data.transforms import EvalBatchTransform, eval_transform

    rng = np.random.default_rng(0)
    aug = AugmentConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(32, 32), (64, 64), (32, 32), (50, 71), (17, 90), (64, 64), (8, 8)]]
    images += [Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)),
               Image.fromarray(rng.integers(0, 4096, (32, 32), dtype=np.uint16)),
               Image.fromarray(rng.integers(0, 256, (32, 48, 4), dtype=np.uint8))]
    assert [image.mode for image in images[-3:]] == ["L", "I;16", "RGBA"]
    rgb = [to_rgb8(image) for image in images]
    one = eval_transform(32, aug)
    batched = EvalBatchTransform(32, aug)
    expected = torch.stack([one(image) for image in rgb])
    got = batched.batch([batched.image(image) for image in rgb])
    assert got.shape == (len(rgb), 3, 32, 32) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)  # as the network runs it (load_folder)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert torch.equal(batched(rgb[3]), one(rgb[3]))  # called on one image, it is eval_transform


def test_the_decoding_workers_follow_the_measured_costs() -> None:
    """On a machine whose cores all run the forward pass's lanes a worker would take one of them: none, however
    dear decoding is (the lanes decode beside each other's forward passes). With cores to spare, a worker pays
    once decoding is a tenth of the forward pass."""
    from cass.inference import auto_workers

    assert auto_workers(0.25e-3, 0.45e-3, cores=2, threads=2) == 0  # 64 px PNG vs test_resnet, 2 cores
    assert auto_workers(3e-3, 1e-3, cores=2, threads=2) == 0  # decoding dearer than the forward pass: still the lanes
    assert auto_workers(3e-3, 1e-3, cores=4, threads=2) == 2  # two spare cores, decoding 3x the forward pass
    assert auto_workers(0.4e-3, 2.0e-3, cores=16, threads=8) == 1  # spare cores: hiding a fifth of the time pays
    assert auto_workers(10e-3, 2.0e-3, cores=16, threads=8) == 4  # at most 4
    assert auto_workers(0.1e-3, 2.0e-3, cores=16, threads=8) == 0  # a twentieth: not worth the processes
    assert auto_workers(5e-3, 1e-3, cores=1, threads=1) == 0


def test_chosen_workers_and_lanes_score_like_the_in_process_path(model_dir: Path, demo_root: Path,
                                                                 tmp_path: Path) -> None:
    """workers=None scores the first batch in this process, then the rest with the workers it chose; lanes score
    several batches at once on threads of their own. Every arrangement gives the same probabilities (within
    the rounding of another thread count), positions in input order and failures as one lane decoding in this
    process (a bad file in the first batch and one after it)."""
    import threading

    import torch

    from cass.inference import classify, lanes_for, load_folder

    paths: list[str | bytes] = [str(p) for p in _images(demo_root)[:23]]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths[2], paths[17] = str(tmp_path / "bad.png"), str(tmp_path / "missing.png")
    loaded = load_folder(model_dir)
    scored_on: set[str] = set()
    loaded.model.register_forward_hook(lambda *_: scored_on.add(threading.current_thread().name))
    arrangements = {"in process": (0, 1), "chosen workers": (None, 1), "one worker": (1, 1), "3 lanes": (0, 3),
                    "worker and 2 lanes": (1, 2)}
    def started_thread_sees() -> int:  # torch's threads in a thread started now (lanes set their own)
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    runs, threads_by_run = {}, {}
    before = torch.get_num_threads()
    try:
        for name, (workers, lanes) in arrangements.items():
            # lanes split 2 torch threads (1 each), as on a 2-core machine; the tests' default is 1 (conftest)
            torch.set_num_threads(2 if lanes > 1 else before)
            scored_on.clear()
            runs[name] = list(classify(loaded.model, loaded.spec, loaded.transform, paths, batch_size=5,
                                       workers=workers, lanes=lanes))
            threads_by_run[name] = set(scored_on)
            if lanes > 1:  # the lanes' 1 thread each does not stay the default of threads started later
                assert torch.get_num_threads() == started_thread_sees() == 2, name
    finally:
        torch.set_num_threads(before)
    for batches in runs.values():
        assert [i for b in batches for i in b.indices] == [i for i in range(23) if i not in (2, 17)]
        assert [i for b in batches for i, _ in b.failed] == [2, 17]
    probs = {name: np.concatenate([b.probs for b in batches]) for name, batches in runs.items()}
    for name in arrangements:
        np.testing.assert_allclose(probs[name], probs["in process"], rtol=0, atol=PROB_ATOL, err_msg=name)
    assert runs["chosen workers"][0].workers == 0 and runs["chosen workers"][-1].workers in range(5)
    assert threads_by_run["in process"] == {threading.current_thread().name}
    lanes_used = threads_by_run["3 lanes"]  # up to 3 threads: one that finishes early may take two batches
    assert 2 <= len(lanes_used) <= 3 and all(name.startswith("cass-lane") for name in lanes_used), lanes_used
    assert lanes_for(5, threads=2) == (2, 1) and lanes_for(1, threads=2) == (1, 2)  # one batch: one lane, all threads
    assert lanes_for(40, threads=16) == (4, 4) and lanes_for(40, threads=2, lanes=3) == (3, 1)


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
        (["--model", str(model_dir), image, "--lanes", "0"], "2"),
        (["--model", "cass-demo-cnn@champion", image], "2"),  # neither a folder nor a URI
        (["--model", str(model_dir), str(tmp_path / "missing")], "3"),
        (["--model", str(model_dir), str(tmp_path / "*.png")], "3"),  # a glob that matches nothing
        (["--model", str(model_dir), "--csv", str(no_path)], "3"),
        (["--model", str(model_dir), image, "--output", str(tmp_path / "nowhere" / "p.csv")], "2"),
    ):
        assert _imports_after(["predict", *argv, *settings], tmp_path) == (code, []), argv
