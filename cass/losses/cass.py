"""The CASS objective (Singh, Sizikova & Cirrone, 2022, arXiv:2206.04170)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CASSLoss(nn.Module):
    """``2 - 2 cos(z_cnn, z_vit)`` per sample, averaged over the batch; range [0, 4].

    The same augmented view goes through the CNN and the ViT; the loss pulls the two embeddings of an
    image together, and both networks receive gradients.

    >>> loss = CASSLoss()
    >>> z = torch.randn(8, 16)
    >>> float(loss(z, z)) < 1e-6
    True
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> torch.Tensor:
        if z_cnn.shape != z_vit.shape:
            raise ValueError(f"embedding shapes differ: CNN {tuple(z_cnn.shape)} vs ViT {tuple(z_vit.shape)}")
        a = F.normalize(z_cnn.float(), dim=-1, eps=self.eps)
        b = F.normalize(z_vit.float(), dim=-1, eps=self.eps)
        return (2.0 - 2.0 * (a * b).sum(dim=-1)).mean()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalised embeddings: 1/sqrt(d) when spread, 0 when collapsed."""
    zn = F.normalize(z.float(), dim=-1)
    return zn.std(dim=0).mean()
