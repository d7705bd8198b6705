"""The CASS loss and focal loss against their definitions and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cass.losses import CASSLoss, EmbeddingSpread, FocalLoss, class_weights, embedding_std


def test_cass_loss_range_zero_and_symmetry() -> None:
    torch.manual_seed(0)
    loss = CASSLoss()
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(a, 3.0 * a)) == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert float(loss(a, -a)) == pytest.approx(4.0, abs=1e-5)  # opposite embeddings: the maximum
    assert 0.0 <= float(loss(a, b)) <= 4.0
    assert float(loss(a, b)) == pytest.approx(float(loss(b, a)), abs=1e-7)


def test_cass_loss_matches_formula() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert float(CASSLoss()(a, b)) == pytest.approx(2 - 2 * math.cos(math.pi / 4), abs=1e-6)


def test_cass_loss_rejects_mismatched_heads() -> None:
    with pytest.raises(ValueError, match="embedding shapes differ"):
        CASSLoss()(torch.randn(4, 8), torch.randn(4, 16))


def test_cass_loss_decreases_under_training_and_trains_both() -> None:
    torch.manual_seed(0)
    cnn, vit = torch.nn.Linear(10, 8), torch.nn.Linear(10, 8)
    opt = torch.optim.Adam([*cnn.parameters(), *vit.parameters()], lr=1e-2)
    x = torch.randn(32, 10)
    first = None
    for _ in range(50):
        loss = CASSLoss()(cnn(x), vit(x))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert cnn.weight.grad.abs().sum() > 0 and vit.weight.grad.abs().sum() > 0
        opt.step()
    assert float(loss) < 0.5 * first


def test_embedding_std_detects_collapse() -> None:
    torch.manual_seed(0)
    spread = embedding_std(torch.randn(4096, 64))
    assert float(spread) == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = embedding_std(torch.ones(256, 64) + 1e-4 * torch.randn(256, 64))
    assert float(collapsed) < 0.01 / math.sqrt(64)


def test_embedding_spread_over_an_epoch_equals_the_whole_batch() -> None:
    # The loops add batch by batch (and processes sum their running sums): same figure as one big batch.
    torch.manual_seed(1)
    z = torch.randn(300, 32) + torch.linspace(0, 2, 32)
    spread = EmbeddingSpread(32)
    for chunk in z.split(64):
        spread.add(chunk)
    assert spread.std(len(z)) == pytest.approx(float(F.normalize(z.double(), dim=-1).std(dim=0).mean()), rel=1e-9)
    assert spread.healthy == pytest.approx(1 / math.sqrt(32))


def test_softmax_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    p = torch.softmax(logits, -1)
    p0, p1 = float(p[0, 0]), float(p[1, 2])
    gamma, alpha = 2.0, 0.5
    expected = alpha * (-((1 - p0) ** gamma) * math.log(p0) - ((1 - p1) ** gamma) * math.log(p1)) / 2
    assert float(FocalLoss(gamma, alpha)(logits, target)) == pytest.approx(expected, rel=1e-5)
    w = torch.tensor([1.0, 1.0, 3.0])
    weighted = alpha * (-((1 - p0) ** gamma) * math.log(p0) - 3 * ((1 - p1) ** gamma) * math.log(p1)) / 2
    assert float(FocalLoss(gamma, alpha, w)(logits, target)) == pytest.approx(weighted, rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy() -> None:
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(float(ce), rel=1e-5)


def test_sigmoid_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[1.0, -2.0]])
    target = torch.tensor([[1.0, 1.0]])  # multi-label: both positive
    s = torch.sigmoid(logits)[0]
    terms = [-((1 - float(s[i])) ** 2) * math.log(float(s[i])) for i in range(2)]
    assert float(FocalLoss(2.0, 1.0, multilabel=True)(logits, target)) == pytest.approx(sum(terms) / 2, rel=1e-5)
    target0 = torch.tensor([[0.0, 0.0]])
    terms0 = [-(float(s[i]) ** 2) * math.log(1 - float(s[i])) for i in range(2)]
    assert float(FocalLoss(2.0, 1.0, multilabel=True)(logits, target0)) == pytest.approx(sum(terms0) / 2, rel=1e-5)


def test_class_weight_schemes() -> None:
    counts = [80, 15, 5]
    inv = class_weights(counts, "inverse_frequency")
    assert inv.tolist() == pytest.approx([100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5)])
    assert inv[2] > inv[1] > inv[0]  # rare classes weigh more
    authors = class_weights(counts, "authors")
    assert authors.tolist() == pytest.approx([1.0, 10 / 75, 0.0])  # the notebook's min-max scaled counts
    assert class_weights(counts, "none").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no training example"):
        class_weights([3, 0], "inverse_frequency")
