"""Data-parallel training under torchrun on CPU (gloo): N processes compute what one process computes.

The equivalence runs use ``test_convnext`` as the CNN: its LayerNorms do not depend on the batch, so
two processes of 4 images must match one process of 8 exactly up to float rounding. (With BatchNorm,
per-process statistics differ from global ones unless ``sync_batchnorm`` is on, and SyncBatchNorm
has no CPU implementation: that path needs CUDA and is not exercised here.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cass.cass_pretraining import pretrain
from cass.cli import main
from cass.config import params_from_mapping
from cass.data.dataset import ImageDataset
from cass.data.manifest import read_manifest
from cass.data.transforms import cass_transform
from cass.distributed import ENV_VARS, local_batch_size, torchrun_command
from cass.errors import ConfigError
from cass.finetune import finetune
from cass.outputs import PretrainOutputs
from cass.training import load_checkpoint
from tests.conftest import free_port, tiny_mapping

TIMEOUT = 600  # torch and timm import slowly in two processes on a busy 2-core machine

# Two epochs of 36 images, global batch 8 accumulated twice: 2 optimiser steps per epoch.
SETTINGS = {"model": {"cnn": "test_convnext"}, "pretrain": {"epochs": 2, "batch_size": 8, "accumulate": 2}}

WORKER = """
import sys
from pathlib import Path

from cass.config import load_params
from cass.finetune import finetune
from cass.cass_pretraining import pretrain


class Interrupted(Exception):
    pass


def stop_after_first_epoch(epoch, _metrics):
    if epoch == 1:
        raise Interrupted("simulated interruption after epoch 1")


job, params_file, data_dir, out = sys.argv[1], load_params(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
if job == "interrupted-pretrain":
    pretrain(params_file, data_dir, out, callbacks=[stop_after_first_epoch], progress=False)
elif job == "pair-per-rank":  # each rank keeps its whole pair (targets, projectors, predictors) to compare
    import os

    import torch

    import cass.cass_pretraining

    pairs = []
    build_pair = cass.cass_pretraining.build_pair
    cass.cass_pretraining.build_pair = lambda params: pairs.append(build_pair(params)) or pairs[-1]
    pretrain(params_file, data_dir, out, progress=False)
    torch.save(dict(pairs[0].named_parameters()), out.parent / f"pair-rank{os.environ['RANK']}.pt")
else:  # two stages in one process group, as a flow run under torchrun does
    pretrain(load_params(sys.argv[5]), data_dir, out / "dino", progress=False)
    finetune(params_file, data_dir, "cnn", out / "finetune", Path(sys.argv[6]), progress=False)
"""


def _mapping(root: Path) -> dict:
    raw = tiny_mapping(root)
    for section, values in SETTINGS.items():
        raw[section].update(values)
    return raw


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _torchrun_worker(tmp_path: Path, *args: object) -> subprocess.CompletedProcess:
    """tests' WORKER script in 2 processes on a free loopback port."""
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--max-restarts=0",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "worker.py", *map(str, args)]
    return _run(cmd, tmp_path)


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    for net in ("cnn", "vit"):
        a, b = load_file(str(a_dir / f"{net}.safetensors")), load_file(str(b_dir / f"{net}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=f"{net}.{k} differs")


@pytest.fixture(scope="module")
def one_process(demo_root: Path, prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same settings trained uninterrupted in this (single) process."""
    out = tmp_path_factory.mktemp("one-process") / "pretrain"
    pretrain(params_from_mapping(_mapping(demo_root)), prepared_dir, out, progress=False)
    return out


def test_two_processes_end_with_the_weights_of_one_process(one_process: Path, demo_root: Path, prepared_dir: Path,
                                                          tmp_path: Path) -> None:
    # Guards: DistributedSampler sharding + per-image augmentation seeds + DDP gradient averaging keep
    # the global batch; `cass pretrain --nproc 2` re-launches under torchrun; rank 0 alone writes.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_mapping(demo_root)))
    shutil.copytree(prepared_dir, tmp_path / "outputs" / "data")
    done = _run([sys.executable, "-m", "cass.cli", "pretrain", "--nproc", "2", "-q"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "outputs" / "pretrain"
    _assert_same_weights(one_process, out)
    two, one = json.loads((out / "metrics.json").read_text()), json.loads((one_process / "metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    # The loss and the collapse indicator are summed over both processes: the whole epoch, not rank 0's half.
    for key in ("final_loss", "cnn_embedding_std", "vit_embedding_std"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), key
    assert done.stdout.count('"final_loss"') == 1, "only rank 0 reports"


def test_two_process_checkpoint_resumes_in_one_process(one_process: Path, demo_root: Path, prepared_dir: Path,
                                                       tmp_path: Path) -> None:
    # Guards: checkpoints hold plain state_dicts (no DDP "module." prefix) and a global-batch schedule,
    # so a run interrupted under 2 processes finishes in 1 exactly as if it had never stopped.
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_mapping(demo_root)))
    out = tmp_path / "pretrain"
    interrupted = _torchrun_worker(tmp_path, "interrupted-pretrain", params_file, prepared_dir, out)
    assert interrupted.returncode != 0 and "simulated interruption" in interrupted.stderr, interrupted.stderr[-4000:]
    state = load_checkpoint(PretrainOutputs(out).checkpoint)
    assert state["epoch"] == 0 and not (out / "cnn.safetensors").exists()
    assert not any(k.startswith("module.") for k in [*state["cnn"], *state["vit"]])

    resumed = pretrain(params_from_mapping(_mapping(demo_root)), prepared_dir, out, progress=False)
    assert json.loads(resumed.metrics.read_text())["epochs"] == 2
    _assert_same_weights(one_process, out)


def test_dino_and_finetuning_in_two_processes_match_one_process(one_process: Path, demo_root: Path,
                                                                prepared_dir: Path, tmp_path: Path) -> None:
    # Guards the DINO baseline under DDP (student gradients averaged, teacher centre over the global batch,
    # per-image multi-crop seeds) and the fine-tuning loop (rank 0 validates and every rank follows its
    # early-stopping decision, so none hangs), both in one process group as a flow run uses it.
    dino = _mapping(demo_root)
    dino["pretrain"].update(method="dino", epochs=1, dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                                                          "local_crops": 2, "local_crop_size": 32})
    tuned = _mapping(demo_root)
    tuned["finetune"].update(epochs=2, patience=1, batch_size=8, accumulate=2)
    for name, raw in (("dino.yaml", dino), ("finetune.yaml", tuned)):
        (tmp_path / name).write_text(yaml.safe_dump(raw))
    out = tmp_path / "two"
    done = _torchrun_worker(tmp_path, "dino-then-finetune", tmp_path / "finetune.yaml", prepared_dir, out,
                            tmp_path / "dino.yaml", one_process)
    assert done.returncode == 0, done.stderr[-4000:]

    single_dino = pretrain(params_from_mapping(dino), prepared_dir, tmp_path / "one" / "dino", progress=False)
    _assert_same_weights(single_dino.out_dir, out / "dino")
    two = json.loads((out / "dino" / "metrics.json").read_text())
    assert two["method"] == "dino" and two["processes"] == 2
    assert two["final_loss"] == pytest.approx(json.loads(single_dino.metrics.read_text())["final_loss"], rel=1e-4)

    single = finetune(params_from_mapping(tuned), prepared_dir, "cnn", tmp_path / "one" / "finetune", one_process,
                      progress=False)
    got, expected = (json.loads(p.read_text()) for p in (out / "finetune" / "metrics.json", single.metrics))
    assert got["epochs_run"] == expected["epochs_run"] and got["best_epoch"] == expected["best_epoch"]
    assert got["best_val_loss"] == pytest.approx(expected["best_val_loss"], rel=1e-3)


def test_two_view_ema_variant_keeps_every_part_in_step_across_processes(demo_root: Path, prepared_dir: Path,
                                                                       tmp_path: Path) -> None:
    # Guards BYOL (two views, projectors, predictors, EMA targets) under DDP: DDP averages the online
    # gradients, so each rank's EMA step moves the same targets the same way; a part left out of the
    # optimiser, of the DDP module or of the EMA update would leave the ranks' pairs apart. (BatchNorm in the
    # projectors sees each process's half batch, so this run is not compared with one process.)
    raw = _mapping(demo_root)
    raw["pretrain"].update(variant="byol", monitor_every=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "pretrain"
    done = _torchrun_worker(tmp_path, "pair-per-rank", tmp_path / "params.yaml", prepared_dir, out)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"pair-rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert any(k.startswith("cnn_target.") for k in ranks[0]) and any(k.startswith("vit_predictor.") for k in ranks[0])
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs between ranks")
    # The targets trail the online networks (EMA, momentum < 1), and rank 0's online backbones are what was saved.
    assert not torch.equal(ranks[0]["cnn_target.projector.0.weight"], ranks[0]["cnn.projector.0.weight"])
    for net in ("cnn", "vit"):
        saved = load_file(str(out / f"{net}.safetensors"))
        for key, value in saved.items():
            if f"{net}.backbone.{key}" in ranks[0]:  # BatchNorm statistics are buffers, not parameters
                torch.testing.assert_close(value, ranks[0][f"{net}.backbone.{key}"], rtol=0, atol=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["variant"] == "byol" and metrics["views"] == 2
    state = load_checkpoint(PretrainOutputs(out).checkpoint)
    assert {"cnn_target", "vit_target", "cnn_predictor"} <= state.keys()
    assert not any(k.startswith("module.") for part in ("cnn", "cnn_target", "vit_predictor") for k in state[part])


def test_global_batch_must_divide_among_processes() -> None:
    assert local_batch_size(32, "pretrain.batch_size", world=4) == 8
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size = 30 .* divisible by the 4 processes"):
        local_batch_size(30, "pretrain.batch_size", world=4)


def test_nproc_is_not_passed_on_to_torchrun() -> None:
    # torchrun's parser would read --nproc as its own --nproc-per-node, and the workers must not relaunch.
    for argv in (["pretrain", "--nproc", "2", "-q"], ["pretrain", "--nproc=2", "-q"], ["pretrain", "--npr", "2", "-q"]):
        cmd = torchrun_command(2, argv)
        assert cmd[-3:] == ["cass.cli", "pretrain", "-q"], cmd
        assert "--nproc_per_node=2" in cmd and "--standalone" in cmd


def test_each_image_gets_the_same_view_whatever_the_load_order(prepared_dir: Path, tiny_params) -> None:
    # Guards the 1-vs-N equivalence: a shard loads images in another order and process than one process.
    df, info = read_manifest(prepared_dir)
    strong = tiny_params.augment.model_copy(update={"affine_p": 1.0, "color_jitter_p": 1.0, "perspective_p": 1.0})
    ds = ImageDataset(Path(info.root), df["path"].tolist()[:4], cass_transform(32, strong))
    forward = [ds[(i, 11)][0] for i in range(4)]
    torch.rand(100)  # the global RNG moves on; the views must not
    backward = [ds[(i, 11)][0] for i in reversed(range(4))][::-1]
    for a, b in zip(forward, backward, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(ds[(0, 12)][0], forward[0])  # the next epoch's seed: other views


def test_only_training_commands_run_under_torchrun(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["data", "show"]) != 0
    assert "only pretrain and finetune run under torchrun" in capsys.readouterr().err


def test_nproc_must_be_positive(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--nproc", "0"]) != 0
    assert "--nproc 0" in capsys.readouterr().err
