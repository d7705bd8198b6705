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
        with torch.autocast(z_cnn.device.type, enabled=False):  # fp32 even inside the forward's autocast
            a = F.normalize(z_cnn.float(), dim=-1, eps=self.eps)
            b = F.normalize(z_vit.float(), dim=-1, eps=self.eps)
            return (2.0 - 2.0 * (a * b).sum(dim=-1)).mean()


class EmbeddingSpread:
    """The collapse indicator of self-supervised pretraining, over a whole epoch.

    The per-dimension standard deviation of the L2-normalised embeddings, averaged over the ``dim``
    dimensions: about ``healthy`` = 1/sqrt(dim) when the embeddings spread over the sphere, 0 when every
    image maps to the same point. It keeps running sums (two vector additions per batch), so several
    processes add theirs with one all-reduce of :attr:`sums` before :meth:`std`.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        self.sums = torch.zeros(2, dim, dtype=torch.float64, device=device)  # sum of z and of z**2
        self.healthy = dim**-0.5

    @torch.no_grad()
    def add(self, z: torch.Tensor) -> None:
        zn = F.normalize(z.detach().double(), dim=-1)
        self.sums[0] += zn.sum(0)
        self.sums[1] += zn.square().sum(0)

    def std(self, n: int) -> float:
        """The indicator over the ``n`` embeddings added (by every process, once their sums are reduced)."""
        mean, mean_sq = self.sums / n
        var = (mean_sq - mean**2).clamp_min(0) * n / max(n - 1, 1)
        return float(var.sqrt().mean())


def embedding_std(z: torch.Tensor) -> float:
    """:class:`EmbeddingSpread` of one batch of embeddings: 1/sqrt(d) when spread, 0 when collapsed."""
    spread = EmbeddingSpread(z.shape[-1], z.device)
    spread.add(z)
    return spread.std(len(z))
