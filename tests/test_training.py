"""Pretraining, fine-tuning and evaluation on tiny networks and the tiny demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cass.config import params_from_mapping
from cass.engine import Engine, Step
from cass.errors import TrainingError
from cass.evaluate import evaluate
from cass.finetune import finetune, load_classifier
from cass.models import create_network
from cass.pretrain import CassLearner, pretrain
from cass.training import EpochCallback
from tests.conftest import tiny_mapping


def _params(root: Path, **sections):
    raw = tiny_mapping(root)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return params_from_mapping(raw)


def test_one_cass_step_changes_both_networks_and_zeroes_gradients(tmp_path: Path) -> None:
    params = _params(tmp_path, pretrain={"device": "cpu"})
    learner = CassLearner(params, Engine(params.pretrain, seed=0, key="pretrain"))
    cnn, vit = learner.backbones()["cnn"], learner.backbones()["vit"]
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("cnn", cnn), ("vit", vit))}
    out = learner.step((torch.randn(8, 3, 32, 32), torch.full((8,), -1)), Step(lr=1e-3))
    loss, z_cnn, z_vit = out.losses["loss"], out.embeddings["cnn"], out.embeddings["vit"]
    assert z_cnn.shape == z_vit.shape == (8, 16) and 0 <= float(loss) <= 4
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in cnn.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.parameters())
    learner.optimizer_step(Step(lr=1e-3))
    for name, model in (("cnn", cnn), ("vit", vit)):
        changed = [not torch.equal(a, b) for a, b in zip(before[name], model.parameters(), strict=True)]
        assert sum(changed) > len(changed) // 2, f"{name} barely changed"
        assert all(p.grad is None for p in model.parameters()), f"{name} gradients not zeroed"


def test_pretraining_writes_weights_metrics_and_collapse_indicator(prepared_dir: Path, demo_root: Path,
                                                                   tmp_path: Path) -> None:
    out = pretrain(_params(demo_root), prepared_dir, tmp_path / "pre", progress=False)
    metrics = json.loads(out.metrics.read_text())
    assert metrics["epochs"] == 1 and metrics["images"] == 36  # every training image, not a label subset
    assert metrics["healthy_embedding_std"] == pytest.approx(1 / 4)  # embed_dim 16
    assert 0 <= metrics["cnn_embedding_std"] <= 1 and 0 <= metrics["vit_embedding_std"] <= 1
    assert set(load_file(str(out.cnn))) and set(load_file(str(out.vit)))
    assert "cnn_embedding_std" in out.history.read_text()
    assert json.loads(out.networks.read_text())["method"] == metrics["method"] == "cass"


class Interrupt(Exception):
    """A simulated interruption (Ctrl-C, a killed job) once an epoch has ended."""


def interrupt_after(epoch: int) -> EpochCallback:
    def callback(done: int, _metrics) -> None:
        if done == epoch:
            raise Interrupt

    return callback


def test_resume_after_interruption_matches_uninterrupted_run(prepared_dir: Path, demo_root: Path,
                                                             tmp_path: Path) -> None:
    params = _params(demo_root, pretrain={"epochs": 2})
    full = pretrain(params, prepared_dir, tmp_path / "full", progress=False)

    with pytest.raises(Interrupt):
        pretrain(params, prepared_dir, tmp_path / "resumed", callbacks=[interrupt_after(1)], progress=False)
    assert not (tmp_path / "resumed" / "cnn.safetensors").exists()
    resumed = pretrain(params, prepared_dir, tmp_path / "resumed", progress=False)
    for net in ("cnn", "vit"):
        a, b = load_file(str(full.weights(net))), load_file(str(resumed.weights(net)))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{net}.{k} differs after resume")
    assert json.loads(resumed.metrics.read_text())["epochs"] == 2


def test_non_finite_loss_stops_with_a_clear_message(prepared_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    net = create_network("test_resnet", 16, "cnn", 32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    first_weight = next(k for k, v in state.items() if v.dtype.is_floating_point and v.dim() == 4)
    state[first_weight][:] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    params = _params(demo_root, model={"cnn_weights": str(tmp_path / "nan.safetensors")})
    with pytest.raises(TrainingError, match="non-finite loss"):
        pretrain(params, prepared_dir, tmp_path / "pre", progress=False)


def test_finetune_from_cass_keeps_best_epoch_and_evaluates(prepared_dir: Path, demo_root: Path,
                                                            tmp_path: Path) -> None:
    params = _params(demo_root, finetune={"epochs": 3, "patience": 1, "label_fraction": 0.25})
    pre = pretrain(params, prepared_dir, tmp_path / "pre", progress=False)
    seen = []
    out = finetune(params, prepared_dir, "cnn", tmp_path / "ft", pre.out_dir, callbacks=[lambda e, m: seen.append(m)],
                   progress=False)
    summary = json.loads(out.metrics.read_text())
    assert summary["labelled_images"] == 8  # 25 % of 9 training images per class, stratified: 2 each
    assert len(seen) == summary["epochs_run"] and all("val_loss" in m for m in seen)  # validated every epoch
    best = min(seen, key=lambda m: m["val_loss"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_loss"] == pytest.approx(best["val_loss"])
    model, spec = load_classifier(out.out_dir)
    assert spec.classes == ("adipose", "lymphocytes", "stroma", "tumor") and spec.arch == "test_resnet"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    ev = evaluate(params, prepared_dir, out.out_dir, tmp_path / "ev")
    metrics = json.loads(ev.metrics.read_text())
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["num_samples"] == 16
    assert ev.confusion_matrix.stat().st_size > 0 and ev.roc.stat().st_size > 0


def test_interrupted_finetuning_resumes_to_the_uninterrupted_result(prepared_dir: Path, demo_root: Path,
                                                                     tmp_path: Path) -> None:
    params = _params(demo_root, finetune={"epochs": 3, "patience": 3, "accumulate": 2, "freeze_epochs": 1,
                                          "label_fraction": 0.25})
    pretrain(params, prepared_dir, tmp_path / "pre", progress=False)
    full = finetune(params, prepared_dir, "cnn", tmp_path / "full", tmp_path / "pre", progress=False)
    assert not full.checkpoint.exists()  # a finished fine-tuning leaves nothing to resume
    with pytest.raises(Interrupt):
        finetune(params, prepared_dir, "cnn", tmp_path / "resumed", tmp_path / "pre", callbacks=[interrupt_after(2)],
                 progress=False)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file() and not (tmp_path / "resumed" / "model.json").exists()
    seen: list[int] = []
    resumed = finetune(params, prepared_dir, "cnn", tmp_path / "resumed", tmp_path / "pre",
                       callbacks=[lambda e, _m: seen.append(e)], progress=False)
    assert seen == [3] and not resumed.checkpoint.exists()  # only the epoch left ran
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    want, got = (json.loads(o.metrics.read_text()) for o in (full, resumed))
    for key in ("best_epoch", "epochs_run", "best_val_loss", "best_val_macro_f1", "labelled_images"):
        assert got[key] == want[key], key
    # Other settings: the checkpoint is not resumed (a fresh fine-tuning runs every epoch).
    with pytest.raises(Interrupt):
        finetune(params, prepared_dir, "cnn", tmp_path / "other", tmp_path / "pre", callbacks=[interrupt_after(2)],
                 progress=False)
    other = _params(demo_root, finetune={"epochs": 3, "patience": 3, "accumulate": 2, "freeze_epochs": 1,
                                         "label_fraction": 0.25, "lr": 1e-3})
    seen.clear()
    finetune(other, prepared_dir, "cnn", tmp_path / "other", tmp_path / "pre",
             callbacks=[lambda e, _m: seen.append(e)], progress=False)
    assert seen == [1, 2, 3]


def test_finetune_cass_init_refuses_mismatched_pretraining(prepared_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    params = _params(demo_root)
    pre = pretrain(params, prepared_dir, tmp_path / "pre", progress=False)
    other = _params(demo_root, model={"cnn": "resnet18"})
    with pytest.raises(TrainingError, match="holds a pretrained test_resnet"):
        finetune(other, prepared_dir, "cnn", tmp_path / "ft", pre.out_dir, progress=False)
