"""Cross-architecture prediction with a stop-gradient target: the asymmetry of SimSiam and BYOL.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (predictor + stop-gradient);
Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (predictor + EMA target). Pulling two outputs
together has a constant solution (every image mapped to one point); predicting a target that receives no
gradient through this loss removes that fixed point from the dynamics. Here the CNN predicts the ViT's
target and the ViT predicts the CNN's, and the loss is the mean of both directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _distance(p: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """``2 - 2 cos(p, target)`` per sample, averaged; the target is detached (stop-gradient)."""
    a = F.normalize(p.float(), dim=-1, eps=eps)
    b = F.normalize(target.detach().float(), dim=-1, eps=eps)
    return (2.0 - 2.0 * (a * b).sum(dim=-1)).mean()


class CrossPredictionLoss(nn.Module):
    """``(d(p_cnn, sg(t_vit)) + d(p_vit, sg(t_cnn))) / 2`` with ``d = 2 - 2 cos``; range [0, 4].

    ``p_*`` are each network's predictions, ``t_*`` the targets (the other network's projection,
    or its EMA copy's); ``sg`` is stop-gradient, so only the predicting side is trained by each term.

    >>> loss = CrossPredictionLoss()
    >>> p = torch.randn(8, 16, requires_grad=True)
    >>> t = torch.randn(8, 16, requires_grad=True)
    >>> out = loss(p, t, p, t)
    >>> out.backward()
    >>> t.grad is None  # the targets get no gradient
    True
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self, p_cnn: torch.Tensor, t_vit: torch.Tensor, p_vit: torch.Tensor, t_cnn: torch.Tensor
    ) -> torch.Tensor:
        for name, p, t in (("CNN", p_cnn, t_vit), ("ViT", p_vit, t_cnn)):
            if p.shape != t.shape:
                raise ValueError(f"{name} prediction {tuple(p.shape)} and its target {tuple(t.shape)} differ in shape")
        return 0.5 * (_distance(p_cnn, t_vit, self.eps) + _distance(p_vit, t_cnn, self.eps))
