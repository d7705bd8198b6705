"""Pretraining, fine-tuning and evaluation on tiny networks and the tiny demo data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from cass.cass_pretraining import CassLearner, pretrain
from cass.classifier import load_classifier
from cass.cli.output import pretraining_lines
from cass.config import params_from_mapping
from cass.data.manifest import read_manifest
from cass.data.splits import read_subset
from cass.engine import Engine, Step
from cass.errors import TrainingError
from cass.evaluate import evaluate
from cass.finetune import finetune
from cass.models import create_network
from cass.outputs import PretrainOutputs
from cass.training import EpochCallback, load_checkpoint, save_checkpoint
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


def _uninterrupted_and_interrupted(params, prepared_dir: Path, tmp_path: Path) -> tuple[PretrainOutputs, Path]:
    """An uninterrupted pretraining, and the checkpoint of the same one interrupted after epoch 1."""
    full = pretrain(params, prepared_dir, tmp_path / "full", progress=False)
    with pytest.raises(Interrupt):
        pretrain(params, prepared_dir, tmp_path / "resumed", callbacks=[interrupt_after(1)], progress=False)
    return full, PretrainOutputs(tmp_path / "resumed").checkpoint


def _assert_same_backbones(a: PretrainOutputs, b: PretrainOutputs) -> None:
    for net in ("cnn", "vit"):
        wa, wb = load_file(str(a.weights(net))), load_file(str(b.weights(net)))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{net}.{k} differs after resume")


def test_a_checkpoint_of_the_bare_network_layout_still_resumes(prepared_dir: Path, demo_root: Path,
                                                                tmp_path: Path) -> None:
    # Checkpoints written before the variants held each network's state_dict as "cnn"/"vit" without the
    # branch's "backbone." prefix; the paper's recipe resumes them to the same weights.
    params = _params(demo_root, pretrain={"epochs": 2})
    full, path = _uninterrupted_and_interrupted(params, prepared_dir, tmp_path)
    state = load_checkpoint(path)
    for net in ("cnn", "vit"):
        assert all(k.startswith("backbone.") for k in state[net])
        state[net] = {k.removeprefix("backbone."): v for k, v in state[net].items()}
    save_checkpoint(state, path)
    _assert_same_backbones(full, pretrain(params, prepared_dir, path.parent, progress=False))


def test_resume_of_a_two_view_variant_with_ema_targets_matches_uninterrupted_run(
    prepared_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    # byol: two views per image, predictors, and EMA targets that move after every optimiser step with a
    # momentum that depends on the global step; all of it must come back from the checkpoint.
    params = _params(demo_root, pretrain={"epochs": 2, "variant": "byol"})
    full, path = _uninterrupted_and_interrupted(params, prepared_dir, tmp_path)
    assert {"cnn_target", "vit_target", "cnn_predictor", "vit_predictor"} <= set(load_checkpoint(path))
    resumed = pretrain(params, prepared_dir, path.parent, progress=False)
    _assert_same_backbones(full, resumed)
    h_full, h_resumed = (pd.read_csv(o.history) for o in (full, resumed))
    np.testing.assert_allclose(h_full["loss"], h_resumed["loss"], rtol=0, atol=1e-6)
    spec = json.loads(resumed.networks.read_text())
    assert spec["variant"] == "byol" and spec["views"] == 2 and spec["augment_recipe"] == "paper"


@pytest.mark.parametrize("method", ["cass", "dino"])
def test_knn_monitor_curve_reaches_callbacks_history_and_metrics(method: str, prepared_dir: Path, demo_root: Path,
                                                                 tmp_path: Path) -> None:
    params = _params(demo_root, pretrain={"epochs": 3, "monitor_every": 2, "method": method,
                                          "dino": {"out_dim": 64, "local_crops": 1}})
    seen: list[tuple[int, dict]] = []
    out = pretrain(params, prepared_dir, tmp_path / "pre", progress=False,
                   callbacks=[lambda epoch, record: seen.append((epoch, dict(record)))])
    keys = ("cnn_knn_accuracy", "vit_knn_accuracy")
    # before the first epoch (step 0), every monitor_every epochs (2) and at the end (3); not at epoch 1
    assert [epoch for epoch, record in seen if all(k in record for k in keys)] == [0, 2, 3]
    assert [epoch for epoch, _ in seen] == [0, 1, 2, 3]
    for _, record in seen:
        assert all(0.0 <= record[k] <= 1.0 for k in keys if k in record)
    history = pd.read_csv(out.history)
    assert history[list(keys)].notna().to_numpy().tolist() == [[False, False], [True, True], [True, True]]
    metrics = json.loads(out.metrics.read_text())
    for k in keys:
        assert metrics[f"{k}_start"] == seen[0][1][k]
        assert metrics[k] == history[k].iloc[-1] == seen[-1][1][k]
    # what `cass demo` prints: one line per network, the curve's start and end
    lines = pretraining_lines(out.out_dir)
    for label, net in (("CNN", "cnn"), ("ViT", "vit")):
        line = next(line for line in lines if line.strip().startswith(label))
        assert f"{metrics[f'{net}_knn_accuracy_start']:.3f} -> {metrics[f'{net}_knn_accuracy']:.3f}" in line


def test_knn_monitor_start_survives_a_resume(prepared_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    params = _params(demo_root, pretrain={"epochs": 2, "monitor_every": 1})
    seen: list[tuple[int, dict]] = []
    with pytest.raises(Interrupt):
        pretrain(params, prepared_dir, tmp_path / "pre", progress=False,
                 callbacks=[lambda e, r: seen.append((e, dict(r))), interrupt_after(1)])
    resumed_calls: list[int] = []
    out = pretrain(params, prepared_dir, tmp_path / "pre", progress=False,
                   callbacks=[lambda e, r: resumed_calls.append(e)])
    assert resumed_calls == [2]  # the resumed run does not measure a second start
    assert json.loads(out.metrics.read_text())["cnn_knn_accuracy_start"] == seen[0][1]["cnn_knn_accuracy"]


def test_collapse_is_reported_once_when_it_trips_and_once_at_the_end(
    prepared_dir: Path, demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A threshold of 1 x healthy trips in every epoch (the mean per-dimension std of unit vectors never
    # exceeds it): three collapsed epochs must still give one warning, then one summary.
    params = _params(demo_root, pretrain={"epochs": 3, "collapse_warn_fraction": 1.0})
    with caplog.at_level(logging.INFO, logger="cass"):
        out = pretrain(params, prepared_dir, tmp_path / "pre", progress=False)
    messages = [r.getMessage() for r in caplog.records]
    tripped = [m for m in messages if "possible collapse" in m]
    assert len(tripped) == 1, tripped
    assert "CNN embedding std" in tripped[0] and "ViT embedding std" in tripped[0] and "(epoch 1)" in tripped[0]
    assert "pretrain.variant" in tripped[0]  # says what to do
    summary = [m for m in messages if m.startswith("collapse check")]
    assert len(summary) == 1 and "ended collapsed" in summary[0], summary
    # The advice is given once: the summary points back to the warning instead of repeating it.
    assert "see the warning of epoch 1" in summary[0] and "pretrain.variant" not in summary[0], summary
    assert json.loads(out.metrics.read_text())["collapsed"] is True


ANTI_COLLAPSE_VARIANT = "simsiam"
"""The variant the stage-level collapse test runs (docs/baselines.md)."""


def test_anti_collapse_variant_keeps_both_networks_spread_where_the_paper_collapses(
    prepared_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    # Through the real stage on the demo data, same seed and steps (16 epochs x 4 batches of 8, measured:
    # the paper's recipe ends near 0.13 / 0.03 x healthy, simsiam near 0.91 / 0.76).
    settings = {"epochs": 16, "batch_size": 8, "lr": 2e-3}
    fraction = params_from_mapping({}).pretrain.collapse_warn_fraction
    spread = {}
    for variant in ("paper", ANTI_COLLAPSE_VARIANT):
        params = _params(demo_root, model={"embed_dim": 32}, pretrain={**settings, "variant": variant})
        out = pretrain(params, prepared_dir, tmp_path / variant, progress=False)
        m = json.loads(out.metrics.read_text())
        spread[variant] = {net: m[f"{net}_embedding_std"] / m["healthy_embedding_std"] for net in ("cnn", "vit")}
        assert m["collapsed"] is (variant == "paper"), (variant, m)
    assert max(spread["paper"].values()) < fraction, spread  # without this reference the check proves nothing
    assert min(spread[ANTI_COLLAPSE_VARIANT].values()) > fraction, spread


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
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = _params(demo_root, finetune={"epochs": 3, "patience": 1, "label_fraction": 0.25})
    pre = pretrain(params, prepared_dir, tmp_path / "pre", progress=False)
    seen = []
    with caplog.at_level(logging.INFO, logger="cass"):
        out = finetune(params, prepared_dir, "cnn", tmp_path / "ft", pre.out_dir,
                       callbacks=[lambda e, m: seen.append(m)], progress=False)
    epochs = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("finetune cnn epoch")]
    assert epochs == [f"finetune cnn epoch {e}/3" for e in range(1, len(seen) + 1)]  # each line with the total
    summary = json.loads(out.metrics.read_text())
    assert summary["labelled_images"] == len(read_subset(prepared_dir, 0.25))  # the 25 % subset, no more
    assert len(seen) == summary["epochs_run"] and all("val_loss" in m for m in seen)  # validated every epoch
    best = min(seen, key=lambda m: m["val_loss"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_loss"] == pytest.approx(best["val_loss"])
    model, spec = load_classifier(out.out_dir)
    assert spec.classes == ("adipose", "lymphocytes", "stroma", "tumor") and spec.arch == "test_resnet"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    ev = evaluate(params, prepared_dir, out.out_dir, tmp_path / "ev")
    metrics = json.loads(ev.metrics.read_text())
    test_images = (read_manifest(prepared_dir)[0]["split"] == "test").sum()
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["num_samples"] == test_images
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
