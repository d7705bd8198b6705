"""The CASS variants (cass.variants), their views, the kNN monitor and their settings.

The collapse tests run a minimal pretraining loop (plain Adam, demo images through the real seeded views)
and read the collapse indicator the engine logs: the paper's recipe from random weights collapses within
the test, and each variant with an anti-collapse mechanism keeps both networks spread. Controls remove
the mechanism (no predictor, or no stop-gradient) and must collapse, so the test fails if a variant keeps
its spread for another reason.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import cass.losses.prediction
from cass.config import AugmentConfig, Params, params_from_mapping
from cass.config_training import VARIANT_NAMES
from cass.data.dataset import ImageDataset
from cass.data.manifest import read_manifest
from cass.data.transforms import TwoViewTransform, cass_transform, pretrain_transform
from cass.engine import _channels_last_input
from cass.errors import ConfigError
from cass.losses import AntiCollapseCASSLoss, CASSLoss, CrossPredictionLoss, EmbeddingSpread
from cass.models import create_network
from cass.monitor import KnnMonitor, embed, knn_accuracy, knn_predict
from cass.training import load_weights_file, save_weights
from cass.variants import AUTO_VARIANT, VARIANTS, CassPair, ema_momentum, resolve_variant
from tests.conftest import tiny_mapping

SIZE, DIM = 32, 32
STEPS, LR, BATCH = 40, 2e-3, 32  # measured: the paper's recipe collapses in ~25 of these steps


def _pair(variant: str, seed: int = 0, **kw) -> CassPair:
    torch.manual_seed(seed)
    cnn = timm.create_model("test_resnet", num_classes=DIM)
    vit = timm.create_model("test_vit", num_classes=DIM, img_size=SIZE)
    return CassPair(cnn, vit, variant, projector_dim=DIM, **kw)


def _dataset(demo_root: Path, views: int, aug: AugmentConfig | None = None) -> ImageDataset:
    paths = sorted(str(p.relative_to(demo_root)) for p in demo_root.rglob("*.png"))
    return ImageDataset(demo_root, paths, pretrain_transform(SIZE, aug or AugmentConfig(), views))


def _batch(ds: ImageDataset, step: int, views: int) -> list[torch.Tensor]:
    """The engine's batch: a seeded order, each image's views seeded by (index, step seed)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1000 + step))[:BATCH]
    x, _ = default_collate([ds[(int(i), step)] for i in order])
    return [x] if views == 1 else list(x)


def _pretrain(pair: CassPair, demo_root: Path, steps: int = STEPS) -> dict[str, float]:
    """A few optimiser steps; the collapse indicator over the last 5 batches, as a fraction of healthy."""
    torch.set_num_threads(1)
    ds = _dataset(demo_root, pair.views)
    optimizer = torch.optim.Adam(pair.param_groups(), lr=LR)
    spread = {net: EmbeddingSpread(d) for net, d in pair.embedding_dims().items()}
    seen = 0
    pair.train()
    for step in range(steps):
        loss, z_cnn, z_vit = pair.forward_loss(_batch(ds, step, pair.views))
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pair.after_optimizer_step(step, steps)
        if step >= steps - 5:
            spread["cnn"].add(z_cnn)
            spread["vit"].add(z_vit)
            seen += len(z_cnn)
    return {net: sp.std(seen) / sp.healthy for net, sp in spread.items()}


def _warn_fraction() -> float:
    return params_from_mapping({}).pretrain.collapse_warn_fraction


# --------------------------------------------------------------------------------------------------
# Collapse: the paper's recipe collapses from random weights, the variants do not


@pytest.fixture(scope="module")
def paper_spread(demo_root: Path) -> dict[str, float]:
    return _pretrain(_pair("paper"), demo_root)


def test_paper_recipe_collapses_from_random_weights_within_the_test(paper_spread: dict[str, float]) -> None:
    # The reference the variants are compared against: without it the variant tests prove nothing.
    fraction = _warn_fraction()
    assert paper_spread["cnn"] < fraction and paper_spread["vit"] < fraction, paper_spread


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        ("simsiam", {}),
        ("byol", {}),
        ("simsiam", {"vicreg_weight": 1.0}),  # combined with the variance-covariance term
        ("paper", {"vicreg_weight": 25.0}),  # the variance-covariance term alone (weight 1 is too weak here)
        ("projector", {"vicreg_weight": 25.0}),  # ... on projections: VICReg's own set-up across architectures
    ],
    ids=["simsiam", "byol", "simsiam+vicreg", "paper+vicreg", "projector+vicreg"],
)
def test_variant_keeps_both_networks_spread_where_the_paper_collapses(
    variant: str, options: dict, demo_root: Path, paper_spread: dict[str, float]
) -> None:
    fraction = _warn_fraction()
    spread = _pretrain(_pair(variant, **options), demo_root)
    assert spread["cnn"] > fraction and spread["vit"] > fraction, (variant, options, spread)
    assert min(paper_spread.values()) < fraction  # same steps, same data: the paper's recipe collapsed


def test_without_a_predictor_the_projector_and_two_views_collapse(demo_root: Path) -> None:
    # simsiam/byol minus their predictor: a projector and two views alone do not prevent collapse.
    spread = _pretrain(_pair("projector"), demo_root)
    assert min(spread.values()) < _warn_fraction(), spread


def test_without_stop_gradient_simsiam_collapses(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stop-gradient is SimSiam's mechanism (Chen & He 2021): let gradients into the target and it collapses.
    def distance_with_gradient(p: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        a, b = F.normalize(p.float(), dim=-1, eps=eps), F.normalize(target.float(), dim=-1, eps=eps)
        return (2.0 - 2.0 * (a * b).sum(dim=-1)).mean()

    monkeypatch.setattr(cass.losses.prediction, "_distance", distance_with_gradient)
    spread = _pretrain(_pair("simsiam"), demo_root)
    assert min(spread.values()) < _warn_fraction(), spread


# --------------------------------------------------------------------------------------------------
# The pair's interface


def test_paper_variant_is_the_papers_loss_on_the_networks_outputs() -> None:
    pair = _pair("paper")
    x = torch.randn(6, 3, SIZE, SIZE)
    loss, z_cnn, z_vit = pair.forward_loss(x)
    cnn, vit = pair.backbones()["cnn"], pair.backbones()["vit"]
    assert torch.equal(z_cnn, cnn(x)) and torch.equal(z_vit, vit(x))  # the head outputs, as the paper trains
    assert torch.allclose(loss, CASSLoss()(cnn(x), vit(x)))
    assert pair.views == 1


def test_channels_last_converts_the_cnn_input_only_and_keeps_the_embeddings() -> None:
    pair = _pair("paper").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        _, before, _ = pair.forward_loss(x)
    seen: dict[str, bool] = {}

    def record(name: str):
        return lambda _module, args: seen.__setitem__(name, args[0].is_contiguous(memory_format=torch.channels_last))

    pair.cnn.backbone.conv1.register_forward_pre_hook(record("cnn"))  # the first layers the input reaches
    pair.vit.backbone.patch_embed.register_forward_pre_hook(record("vit"))
    pair.cnn.to(memory_format=torch.channels_last)  # what the engine does on CUDA with channels_last=pair.cnn
    pair.cnn.register_forward_pre_hook(_channels_last_input)
    with torch.no_grad():
        _, after, _ = pair.forward_loss(x)
    assert seen == {"cnn": True, "vit": False}
    assert torch.allclose(before, after, atol=1e-5)


def test_paper_with_vicreg_is_the_existing_anti_collapse_loss() -> None:
    pair = _pair("paper", vicreg_weight=0.7)
    x = torch.randn(6, 3, SIZE, SIZE)
    loss, z_cnn, z_vit = pair.forward_loss([x])
    assert torch.allclose(loss, AntiCollapseCASSLoss(0.7)(z_cnn, z_vit))


def test_two_view_variants_send_each_network_its_own_view() -> None:
    pair = _pair("simsiam").eval()
    a, b = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE)
    _, z_cnn, z_vit = pair.forward_loss([a, b])
    assert torch.allclose(z_cnn, pair.cnn(a)[1]) and torch.allclose(z_vit, pair.vit(b)[1])
    with pytest.raises(ValueError, match=r"takes 2 view\(s\) per image"):
        pair.forward_loss([a])


def test_param_groups_hold_each_network_and_never_a_target_or_an_unused_head() -> None:
    paper = _pair("paper")
    groups = paper.param_groups()
    assert [g["name"] for g in groups] == ["cnn", "vit"]
    for g, net in zip(groups, ("cnn", "vit"), strict=True):
        assert [id(p) for p in g["params"]] == [id(p) for p in paper.backbones()[net].parameters()]

    byol = _pair("byol")
    grouped = {id(p) for g in byol.param_groups() for p in g["params"]}
    targets = {id(p) for t in (byol.cnn_target, byol.vit_target) for p in t.parameters()}
    assert not grouped & targets
    heads = {id(p) for b in byol.backbones().values() for p in b.get_classifier().parameters()}
    assert not grouped & heads  # the projector replaces the embedding head
    predictors = {id(p) for m in (byol.cnn_predictor, byol.vit_predictor) for p in m.parameters()}
    assert predictors <= grouped
    assert grouped | targets | heads == {id(p) for p in byol.parameters()}


def test_targets_get_no_gradient_and_follow_the_online_networks_by_ema() -> None:
    pair = _pair("byol")
    loss, _, _ = pair.forward_loss([torch.randn(4, 3, SIZE, SIZE)] * 2)
    loss.backward()
    assert all(p.grad is None for p in pair.cnn_target.parameters())
    online = next(pair.cnn.projector.parameters())
    target = next(pair.cnn_target.projector.parameters())
    with torch.no_grad():
        online.add_(1.0)
    before = target.detach().clone()
    pair.after_optimizer_step(0, 100)  # momentum 0.99 at the first step
    assert torch.allclose(target, 0.99 * before + 0.01 * online.detach())
    assert ema_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert ema_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert ema_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_cross_prediction_loss_is_symmetric_and_trains_only_the_predicting_side() -> None:
    p_c, t_v, p_v, t_c = (torch.randn(8, 6, requires_grad=True) for _ in range(4))
    loss = CrossPredictionLoss()(p_c, t_v, p_v, t_c)
    expected = 0.5 * (CASSLoss()(p_c, t_v) + CASSLoss()(p_v, t_c))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert t_v.grad is None and t_c.grad is None
    assert p_c.grad.abs().sum() > 0 and p_v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="CNN prediction"):
        CrossPredictionLoss()(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize("variant", ["byol", "simsiam"])
def test_state_dict_round_trip_resumes_exactly(variant: str) -> None:
    torch.set_num_threads(1)
    batches = [[torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE)] for _ in range(5)]

    def step(pair: CassPair, opt: torch.optim.Optimizer, i: int) -> None:
        loss, _, _ = pair.forward_loss(batches[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pair.after_optimizer_step(i, 5)

    a = _pair(variant, seed=0)
    opt_a = torch.optim.Adam(a.param_groups(), lr=1e-3)
    for i in range(3):
        step(a, opt_a, i)
    saved = copy.deepcopy((a.state_dict(), opt_a.state_dict()))
    b = _pair(variant, seed=1)  # other initial weights: everything must come from the checkpoint
    opt_b = torch.optim.Adam(b.param_groups(), lr=1e-3)
    b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    for i in range(3, 5):
        step(a, opt_a, i)
        step(b, opt_b, i)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    if variant == "byol":  # the EMA targets are part of the state, and differ from the online networks
        assert any(k.startswith("cnn_target.") for k in sa)
        assert not torch.equal(sa["cnn_target.projector.0.weight"], sa["cnn.projector.0.weight"])
    assert any(k.startswith("cnn_predictor.") for k in sa)


def test_from_params_builds_the_networks_fine_tuning_loads(tiny_params: Params, tmp_path: Path) -> None:
    params = tiny_params.model_copy(
        update={"pretrain": tiny_params.pretrain.model_copy(update={"variant": "byol"})}
    )
    pair = CassPair.from_params(params)
    assert pair.variant == "byol" and pair.views == 2
    assert pair.embedding_dims() == {"cnn": params.model.embed_dim, "vit": params.model.embed_dim}
    m = params.model
    for net, arch in (("cnn", m.cnn), ("vit", m.vit)):
        save_weights(pair.backbones()[net], tmp_path / f"{net}.safetensors")
        fresh = create_network(arch, m.embed_dim, net, m.image_size)
        load_weights_file(fresh, tmp_path / f"{net}.safetensors")  # strict: same keys and shapes
        x = torch.randn(2, 3, m.image_size, m.image_size)
        assert torch.equal(fresh.eval()(x), pair.backbones()[net].eval()(x))


def test_unknown_variant_and_bad_views_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"pretrain.variant: unknown CASS variant 'simclr'; choose one of paper"):
        _pair("simclr")
    with pytest.raises(ConfigError, match="pretrain.cass.views must be 1 or 2"):
        _pair("simsiam", views=3)


# --------------------------------------------------------------------------------------------------
# Views


def test_two_view_transform_gives_two_different_reproducible_seeded_views(demo_root: Path) -> None:
    for aug in (AugmentConfig(), AugmentConfig(recipe="strong")):
        ds = _dataset(demo_root, 2, aug)
        first, _ = ds[(3, 11)]
        again, _ = ds[(3, 11)]
        other, _ = ds[(3, 12)]
        assert len(first) == 2 and first[0].shape == (3, SIZE, SIZE)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # replayable
        assert not torch.equal(first[0], first[1])  # two different views of the image
        assert not torch.equal(first[0], other[0])  # another epoch seed, other views
    # The first of two views is the view the one-view transform gives for the same seed.
    one = _dataset(demo_root, 1)
    assert torch.equal(one[(3, 11)][0], _dataset(demo_root, 2)[(3, 11)][0][0])


def test_paper_recipe_is_the_papers_transform_and_strong_differs(demo_root: Path) -> None:
    from PIL import Image

    image = Image.open(next(demo_root.rglob("*.png"))).convert("RGB")
    paper = pretrain_transform(SIZE, AugmentConfig(), 1)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        a = paper(image)
        torch.manual_seed(5)
        b = cass_transform(SIZE, AugmentConfig())(image)
        torch.manual_seed(5)
        c = pretrain_transform(SIZE, AugmentConfig(recipe="strong"), 1)(image)
    assert torch.equal(a, b)
    assert c.shape == a.shape and not torch.equal(a, c)
    assert isinstance(pretrain_transform(SIZE, AugmentConfig(), 2), TwoViewTransform)
    with pytest.raises(ValueError, match="pretrain.cass.views must be 1 or 2"):
        pretrain_transform(SIZE, AugmentConfig(), 3)


# --------------------------------------------------------------------------------------------------
# kNN monitor


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_scikit_learn_on_a_fixed_embedding(k: int) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    train_y = rng.integers(0, 4, 200)
    query_y = rng.integers(0, 4, 120)
    train = centres[train_y] + 1.5 * rng.normal(size=(200, 16))
    query = centres[query_y] + 1.5 * rng.normal(size=(120, 16))
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train, train_y)
    ours = knn_predict(torch.tensor(train), torch.tensor(train_y), torch.tensor(query), k)
    assert ours.tolist() == ref.predict(query).tolist()
    accuracy = knn_accuracy(torch.tensor(train), torch.tensor(train_y), torch.tensor(query), torch.tensor(query_y), k)
    assert accuracy == pytest.approx(ref.score(query, query_y))
    assert 0.4 < accuracy < 1.0  # neither chance nor trivial: the comparison means something


def test_knn_caps_k_and_refuses_empty_input() -> None:
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    assert knn_predict(z, y, z, k=50).tolist() == [1, 1, 1]  # k capped at 3: the majority
    with pytest.raises(ValueError, match="at least one training embedding"):
        knn_predict(torch.empty(0, 4), torch.empty(0), z, 1)


def test_monitor_fits_on_the_labelled_subset_scores_on_val_and_never_reads_test(
    prepared_dir: Path, demo_root: Path
) -> None:
    raw = tiny_mapping(demo_root)
    raw["pretrain"].update(monitor_every=1, monitor_k=3, monitor_label_fraction=0.25)
    params = params_from_mapping(raw)
    monitor = KnnMonitor.from_params(params, prepared_dir)
    df, _ = read_manifest(prepared_dir)
    split = dict(zip(df["path"], df["split"], strict=True))
    assert {split[p] for p in monitor.fit.paths} == {"train"}
    assert {split[p] for p in monitor.score.paths} == {"val"}
    assert len(monitor.fit) < (df["split"] == "train").sum()  # the 25 % subset, not every training image
    pair = CassPair.from_params(params)
    pair.train()
    scores = monitor(pair.backbones())
    assert set(scores) == {"cnn_knn_accuracy", "vit_knn_accuracy"}
    assert all(net.training for net in pair.backbones().values())  # training mode restored
    # The figure is the kNN accuracy of each network's pooled features, fit set against val set.
    for net, backbone in pair.backbones().items():
        fit_x = torch.stack([monitor.fit[i][0] for i in range(len(monitor.fit))])
        score_x = torch.stack([monitor.score[i][0] for i in range(len(monitor.score))])
        fit_z, score_z = embed(backbone, [fit_x]), embed(backbone, [score_x])
        assert fit_z.shape == (len(monitor.fit), backbone.num_features)
        expected = knn_accuracy(fit_z, torch.as_tensor(monitor.fit.targets), score_z,
                                torch.as_tensor(monitor.score.targets), k=3)
        assert scores[f"{net}_knn_accuracy"] == pytest.approx(expected)


def test_monitor_refuses_multilabel_data(prepared_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    import shutil

    copy_dir = tmp_path / "data"
    shutil.copytree(prepared_dir, copy_dir)
    info = copy_dir / "dataset.json"
    info.write_text(info.read_text().replace('"multilabel": false', '"multilabel": true'))
    with pytest.raises(ConfigError, match="pretrain.monitor_every: the kNN monitor needs single-label data"):
        KnnMonitor.from_params(params_from_mapping(tiny_mapping(demo_root)), copy_dir)


# --------------------------------------------------------------------------------------------------
# Settings


def test_variant_settings_are_validated_by_name() -> None:
    with pytest.raises(ConfigError) as err:
        params_from_mapping({"pretrain": {"variant": "simclr"}})
    text = str(err.value)
    assert "pretrain.variant" in text and "'simclr'" in text
    assert all(f"'{name}'" in text for name in VARIANTS)
    with pytest.raises(ConfigError, match="pretrain.cass.views"):
        params_from_mapping({"pretrain": {"cass": {"views": 3}}})
    with pytest.raises(ConfigError, match="augment.recipe"):
        params_from_mapping({"augment": {"recipe": "heavy"}})
    with pytest.raises(ConfigError, match="augment.crop_scale"):
        params_from_mapping({"augment": {"crop_scale": [0.8, 0.2]}})
    with pytest.raises(ConfigError, match="pretrain.monitor_label_fraction 0.5 is not one of split.label_fractions"):
        params_from_mapping({"pretrain": {"monitor_label_fraction": 0.5}})


def test_defaults_keep_the_papers_recipe() -> None:
    params = params_from_mapping({})
    assert params.pretrain.variant == "paper" and params.augment.recipe == "paper"
    assert params.pretrain.monitor_every == 0 and params.pretrain.anti_collapse == "none"
    assert params.data.demo_kind == "tissue"
    pair = CassPair.from_params(params_from_mapping({"model": {"cnn": "test_resnet", "vit": "test_vit",
                                                                "image_size": 32, "embed_dim": 8}}))
    assert pair.variant == "paper" and pair.views == 1 and pair.cnn_predictor is None and pair.cnn_target is None


def test_every_variant_name_has_a_spec_and_every_spec_a_name() -> None:
    """The names are listed once (config_training.CassVariant, what settings accept); VARIANTS holds a spec
    for each name, in the same order, and for nothing else."""
    assert tuple(VARIANTS) == VARIANT_NAMES
    assert AUTO_VARIANT in VARIANT_NAMES


def test_auto_variant_is_the_measured_choice_from_any_start(tmp_path: Path) -> None:
    weights = tmp_path / "cnn.safetensors"
    assert resolve_variant(params_from_mapping({"pretrain": {"variant": "auto"}})) == AUTO_VARIANT == "paper"
    assert resolve_variant(params_from_mapping({"pretrain": {"variant": "auto"},
                                                "model": {"cnn_weights": str(weights)}})) == "paper"
    assert resolve_variant(params_from_mapping({"pretrain": {"variant": "byol"}})) == "byol"
    assert math.isclose(params_from_mapping({}).pretrain.cass.ema_momentum, 0.99)
