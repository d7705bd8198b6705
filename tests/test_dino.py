"""The DINO baseline's parts, the ``--method dino`` stage, and the opt-in anti-collapse term for CASS."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import distributed as dist
from torch import nn

from cass.baselines.dino import (
    DINOHead,
    DinoLearner,
    DinoSchedules,
    MultiCropNetwork,
    clip_gradients,
    ema_update,
    local_crop_size,
)
from cass.cass_pretraining import pretrain
from cass.cli import main
from cass.config import AugmentConfig, DinoConfig, Params, params_from_mapping
from cass.data.dataset import ImageDataset, make_loader
from cass.data.manifest import read_manifest
from cass.data.transforms import MultiCropTransform
from cass.errors import ConfigError
from cass.finetune import finetune
from cass.losses import AntiCollapseCASSLoss, CASSLoss, DINOLoss, VarianceCovarianceLoss
from cass.training import Precision
from tests.conftest import tiny_mapping

CPU = torch.device("cpu")
FP32 = Precision(None, False)
SMALL_DINO = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops": 2}


def dino_params(root: Path, **dino) -> Params:
    raw = tiny_mapping(root)
    raw["pretrain"].update(method="dino", dino={**SMALL_DINO, **dino})
    return params_from_mapping(raw)


def crops(batch: int = 8, size: int = 32, local: int = 16, n_local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, local, local, generator=g) for _ in range(n_local)
    ]


# --------------------------------------------------------------------------------------------------
# EMA teacher and schedules


def test_ema_update_is_momentum_weighted_average() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    frozen = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=1.0)
    for t, t0 in zip(teacher.parameters(), frozen, strict=True):
        torch.testing.assert_close(t, t0)


def test_ema_update_refuses_different_architectures() -> None:
    with pytest.raises(ValueError, match="share an architecture"):
        ema_update(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), 0.99)


def test_schedules_follow_the_official_recipe() -> None:
    cfg = DinoConfig(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=3)
    s = DinoSchedules.build(cfg, lr=1e-3, min_lr=1e-6, epochs=10, steps_per_epoch=5, warmup_epochs=2)
    assert len(s.lr) == len(s.momentum) == len(s.weight_decay) == 50
    # teacher momentum: cosine from 0.996 up to (almost) 1, never decreasing
    assert s.momentum[0] == pytest.approx(0.996)
    assert np.all(np.diff(s.momentum) >= 0) and s.momentum[-1] > 0.9999
    # weight decay: cosine from 0.04 up to 0.4
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4, abs=1e-3)
    # learning rate: linear warm-up over 2 epochs to the peak, then down
    assert s.lr[0] == 0.0 and s.lr[10] == pytest.approx(1e-3) and s.lr[-1] < 1e-4
    # teacher temperature: linear warm-up over 3 epochs, then constant
    np.testing.assert_allclose(s.teacher_temp, [0.02, 0.04, 0.06] + [0.06] * 7)


def test_base_learning_rate_uses_the_linear_scaling_rule(demo_root: Path) -> None:
    from cass.baselines.dino import base_lr

    assert base_lr(DinoConfig(), 256) == pytest.approx(5e-4)
    assert base_lr(DinoConfig(), 32) == pytest.approx(5e-4 / 8)
    assert base_lr(DinoConfig(lr=1e-3), 32) == 1e-3


# --------------------------------------------------------------------------------------------------
# Loss: centring and sharpening


def test_center_moves_towards_teacher_batch_mean_with_momentum() -> None:
    loss = DINOLoss(out_dim=5, num_crops=3, center_momentum=0.9)
    t1, t2 = torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    loss(torch.randn(3 * 4, 5), t1, teacher_temp=0.04)
    torch.testing.assert_close(loss.center, 0.1 * t1.mean(0, keepdim=True))
    loss(torch.randn(3 * 4, 5), t2, teacher_temp=0.04)
    torch.testing.assert_close(loss.center, 0.9 * 0.1 * t1.mean(0, keepdim=True) + 0.1 * t2.mean(0, keepdim=True))


def test_loss_is_cross_entropy_over_pairs_of_different_views() -> None:
    torch.manual_seed(0)
    b, d, n = 3, 6, 4
    student, teacher = torch.randn(n * b, d), torch.randn(2 * b, d)
    got = DINOLoss(d, n, student_temp=0.1)(student, teacher, teacher_temp=0.05)
    q = torch.softmax(teacher / 0.05, -1).chunk(2)  # centre is zero on the first call
    s = torch.log_softmax(student / 0.1, -1).chunk(n)
    terms = [-(q[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(n) if v != i]
    assert len(terms) == 2 * n - 2  # a view is never compared with itself
    torch.testing.assert_close(got, torch.stack(terms).mean())


def test_sharpening_turns_teacher_into_hard_targets() -> None:
    torch.manual_seed(1)
    b, d = 4, 7
    student, teacher = torch.randn(2 * b, d), torch.randn(2 * b, d)
    got = DINOLoss(d, 2)(student, teacher, teacher_temp=1e-4)
    targets = teacher.argmax(-1).chunk(2)
    s = torch.log_softmax(student / 0.1, -1).chunk(2)
    want = (-s[1].gather(1, targets[0][:, None]).mean() - s[0].gather(1, targets[1][:, None]).mean()) / 2
    torch.testing.assert_close(got, want)


def test_loss_needs_no_process_group() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    loss = DINOLoss(8, 4)
    value = loss(torch.randn(16, 8), torch.randn(8, 8), teacher_temp=0.04)
    assert torch.isfinite(value) and loss.center.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Multi-crop views


def test_multicrop_gives_two_global_and_n_local_crops(prepared_dir: Path) -> None:
    df, info = read_manifest(prepared_dir)
    transform = MultiCropTransform(32, 16, 3, (0.4, 1.0), (0.05, 0.4), AugmentConfig())
    dataset = ImageDataset(Path(info.root), df["path"].tolist()[:10], transform)
    batch, _ = next(iter(make_loader(dataset, 4, shuffle=False, num_workers=0, seed=0)))
    assert [tuple(c.shape) for c in batch] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert not torch.equal(batch[0], batch[1])  # two different random views of the same images


def test_local_crop_size_defaults_to_96_of_224_on_the_patch_grid() -> None:
    class Vit(nn.Module):
        class patch_embed:  # mimics timm's attribute
            patch_size = (16, 16)

    assert local_crop_size(DinoConfig(), 224, Vit()) == 96
    assert local_crop_size(DinoConfig(), 384, Vit()) == 160
    assert local_crop_size(DinoConfig(), 32, Vit()) == 16  # never below one patch
    assert local_crop_size(DinoConfig(local_crop_size=48), 224, Vit()) == 48


def test_multicrop_network_groups_crops_by_size() -> None:
    calls: list[tuple[int, ...]] = []

    class Backbone(nn.Module):
        num_features = 3

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return x

    net = MultiCropNetwork(Backbone(), DINOHead(3, 10, hidden_dim=8, bottleneck_dim=4))
    feats, out = net(crops(batch=2, n_local=3))
    assert calls == [(4, 3, 32, 32), (6, 3, 16, 16)]  # one backbone pass per resolution
    assert feats.shape == (10, 3) and out.shape == (10, 10)


# --------------------------------------------------------------------------------------------------
# One network's DINO


@pytest.fixture
def learner(demo_root: Path) -> DinoLearner:
    torch.manual_seed(0)
    return DinoLearner.from_params(dino_params(demo_root), "vit", CPU, FP32)


def test_teacher_gets_no_gradients_and_follows_the_student_by_ema(learner: DinoLearner) -> None:
    assert all(not p.requires_grad for p in learner.teacher.parameters())
    teacher_before = [p.detach().clone() for p in learner.teacher.parameters()]
    loss, _ = learner.forward_loss(crops(), teacher_temp=0.04)
    learner.backward(loss)
    assert all(p.grad is None for p in learner.teacher.parameters())
    assert any(p.grad is not None for p in learner.student.parameters())
    learner.optimizer_step(lr=1e-3, weight_decay=0.04, momentum=0.9, freeze_last_layer=False)
    for t, t0, s in zip(learner.teacher.parameters(), teacher_before, learner.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s.detach())


@pytest.mark.parametrize("network", ["cnn", "vit"])
def test_loss_decreases_over_a_few_steps(demo_root: Path, network: str) -> None:
    torch.manual_seed(0)
    learner = DinoLearner.from_params(dino_params(demo_root), network, CPU, FP32)
    batch = crops(batch=4, seed=0)
    losses = []
    for _ in range(8):
        loss, _ = learner.forward_loss(batch, teacher_temp=0.04)
        learner.backward(loss)
        learner.optimizer_step(lr=5e-3, weight_decay=0.04, momentum=0.996, freeze_last_layer=False)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_last_layer_is_frozen_while_asked(learner: DinoLearner) -> None:
    last = [p.detach().clone() for p in learner.student.head.last_layer.parameters()]
    loss, _ = learner.forward_loss(crops(), teacher_temp=0.04)
    learner.backward(loss)
    learner.optimizer_step(lr=1e-2, weight_decay=0.04, momentum=0.996, freeze_last_layer=True)
    for p, p0 in zip(learner.student.head.last_layer.parameters(), last, strict=True):
        torch.testing.assert_close(p, p0)
    # the weight-normalised layer keeps its norm fixed at 1 (norm_last_layer)
    assert not learner.student.head.last_layer.parametrizations.weight.original0.requires_grad


def test_biases_and_norms_get_no_weight_decay(learner: DinoLearner) -> None:
    decay, no_decay = learner.optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] > 0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in learner.student.named_parameters()}
    assert not any(names[id(p)].endswith(".bias") for p in decay["params"])
    # the timm embedding head is not trained by DINO (fine-tuning replaces it)
    head = {id(p) for p in learner.student.backbone.get_classifier().parameters()}
    assert head and not head & {id(p) for g in learner.optimizer.param_groups for p in g["params"]}


def test_gradient_clipping_is_per_parameter() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    model = nn.Module()
    model.a, model.b = a, b
    clip_gradients(model, 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # under the cap: untouched


# --------------------------------------------------------------------------------------------------
# The stage and the command line


def test_cli_method_dino_writes_cass_format_that_resumes_and_finetune_loads(
    prepared_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    assert not (dist.is_available() and dist.is_initialized())  # runs without a process group
    raw = tiny_mapping(demo_root)
    raw["pretrain"]["dino"] = {**SMALL_DINO, "local_crops": 1}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    outputs = tmp_path / "outputs"
    shutil.copytree(prepared_dir, outputs / "data")
    argv = ["pretrain", "--method", "dino", "--params", str(params_file), "--outputs", str(outputs), "-q"]
    assert main(argv) == 0
    pre = outputs / "pretrain"
    weights = (pre / "vit.safetensors").read_bytes()
    assert main(argv) == 0  # resumes from its checkpoint: nothing left to train, same weights
    assert (pre / "vit.safetensors").read_bytes() == weights
    assert len((pre / "history.csv").read_text().strip().splitlines()) == 2  # header + the one epoch
    assert json.loads((pre / "networks.json").read_text())["method"] == "dino"
    metrics = json.loads((pre / "metrics.json").read_text())
    assert metrics["method"] == "dino" and metrics["epochs"] == 1
    assert "data_version" in metrics and "git_commit" in metrics  # the same lineage as CASS pretraining
    assert math.isfinite(metrics["cnn_final_loss"]) and math.isfinite(metrics["vit_final_loss"])
    assert {"cnn_loss", "vit_loss", "cnn_embedding_std", "teacher_momentum"} <= set(
        (pre / "history.csv").read_text().splitlines()[0].split(",")
    )
    from safetensors.torch import load_file

    pretrained = load_file(str(pre / "vit.safetensors"))
    params = params_from_mapping({**raw, "finetune": {**raw["finetune"], "epochs": 1}})
    for network in ("cnn", "vit"):
        out = finetune(params, outputs / "data", network, tmp_path / network, pre, progress=False)
        assert out.weights.is_file()
    tuned = load_file(str(tmp_path / "vit" / "model.safetensors"))
    assert tuned["head.weight"].shape[0] == 4  # the embedding head was replaced by the 4-class classifier
    assert not torch.equal(tuned["pos_embed"], torch.zeros_like(tuned["pos_embed"]))
    assert pretrained["pos_embed"].shape == tuned["pos_embed"].shape


def test_settings_reject_bad_dino_values(demo_root: Path) -> None:
    raw = tiny_mapping(demo_root)
    raw["pretrain"]["method"] = "byol"
    with pytest.raises(ConfigError, match="pretrain.method"):
        params_from_mapping(raw)
    raw = tiny_mapping(demo_root)
    raw["pretrain"]["dino"] = {"locl_crops": 4}
    with pytest.raises(ConfigError, match="did you mean 'local_crops'"):
        params_from_mapping(raw)
    raw["pretrain"]["dino"] = {"local_crop_scale": [0.5, 0.1]}
    with pytest.raises(ConfigError, match="crop scale"):
        params_from_mapping(raw)


def test_supervised_baseline_is_reachable_without_pretraining(prepared_dir: Path, demo_root: Path, tmp_path) -> None:
    raw = tiny_mapping(demo_root)
    raw["finetune"].update(init="random", epochs=1)
    out = finetune(params_from_mapping(raw), prepared_dir, "cnn", tmp_path, pretrain_dir=None, progress=False)
    assert json.loads(out.lineage.read_text())["init"] == "random"


# --------------------------------------------------------------------------------------------------
# Opt-in anti-collapse term for CASS


def test_variance_covariance_is_zero_for_spread_decorrelated_embeddings() -> None:
    hadamard = torch.tensor([[1.0]])
    for _ in range(3):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    z = 1.5 * hadamard[:, 1:5]  # zero-mean, orthogonal columns, std 1.5 * sqrt(8/7) > 1
    assert VarianceCovarianceLoss()(z).item() == pytest.approx(0.0, abs=1e-6)


def test_variance_covariance_penalises_collapse_and_its_gradient_spreads() -> None:
    term = VarianceCovarianceLoss()
    assert term(torch.ones(16, 8)).item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-4)
    z = (0.01 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))).requires_grad_()
    term(z).backward()
    with torch.no_grad():
        assert (z - 10.0 * z.grad).std(0).mean() > z.std(0).mean()
    with pytest.raises(ValueError, match="batch >= 2"):
        term(torch.ones(1, 8))


def test_anti_collapse_cass_loss_adds_weighted_term_for_each_network() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    vc = VarianceCovarianceLoss()
    want = CASSLoss()(a, b) + 0.5 * (vc(a) + vc(b))
    torch.testing.assert_close(AntiCollapseCASSLoss(0.5)(a, b), want)


def test_cass_pretraining_with_anti_collapse_is_opt_in(prepared_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    assert params_from_mapping(tiny_mapping(demo_root)).pretrain.anti_collapse == "none"
    raw = tiny_mapping(demo_root)
    raw["pretrain"]["epochs"] = 2
    plain = pretrain(params_from_mapping(raw), prepared_dir, tmp_path / "plain", progress=False)
    raw["pretrain"]["anti_collapse"] = "vicreg"
    spread = pretrain(params_from_mapping(raw), prepared_dir, tmp_path / "vicreg", progress=False)
    m_plain, m_spread = (json.loads(o.metrics.read_text()) for o in (plain, spread))
    # same seed and data: the only difference is the term, which keeps the embeddings more spread
    assert m_spread["final_loss"] != m_plain["final_loss"]
    assert m_spread["cnn_embedding_std"] > m_plain["cnn_embedding_std"]
    assert m_spread["vit_embedding_std"] > m_plain["vit_embedding_std"]


@pytest.mark.parametrize("method", ["cass", "dino"])
def test_both_methods_flag_and_warn_collapse_alike(method: str, prepared_dir: Path, demo_root: Path,
                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The mean per-dimension std of unit vectors never exceeds 1/sqrt(d), so a warning threshold of 1 x the
    # healthy value must flag every network of either method, in the log and in metrics.json.
    # Over two epochs that both trip, each method warns once (naming both networks) and sums up once at the end.
    raw = tiny_mapping(demo_root)
    raw["pretrain"].update(method=method, epochs=2, collapse_warn_fraction=1.0,
                           dino={**SMALL_DINO, "local_crops": 1})
    with caplog.at_level(logging.WARNING, logger="cass"):
        out = pretrain(params_from_mapping(raw), prepared_dir, tmp_path / "pre", progress=False)
    assert json.loads(out.metrics.read_text())["collapsed"] is True
    warned = [r.getMessage() for r in caplog.records if "possible collapse" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].split()[2] == method.upper()
    assert "CNN embedding std" in warned[0] and "ViT embedding std" in warned[0], warned
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("collapse check")]
    assert len(summary) == 1 and method.upper() in summary[0] and "CNN/ViT" in summary[0], summary
