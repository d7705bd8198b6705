"""An opt-in anti-collapse term for CASS: VICReg's variance and covariance terms.

Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022. This is an extension beyond the CASS paper (off by default): from random
initialisation the plain CASS objective lets both networks emit the same near-constant vector; this
term, applied to each network's raw embeddings, keeps every dimension spread and decorrelated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cass.losses.cass import CASSLoss


class VarianceCovarianceLoss(nn.Module):
    """``mean_j relu(target - std_j) + cov_weight * sum_{i != j} cov_ij^2 / d`` over one batch.

    ``cov_weight`` defaults to VICReg's ratio of covariance to variance weight (1 / 25). Zero when every
    dimension has std >= ``std_target`` and dimensions are uncorrelated; about 1 for collapsed embeddings.

    >>> term = VarianceCovarianceLoss()
    >>> float(term(torch.ones(8, 4))) > 0.9
    True
    """

    def __init__(self, std_target: float = 1.0, cov_weight: float = 1.0 / 25.0, eps: float = 1e-4) -> None:
        super().__init__()
        self.std_target = std_target
        self.cov_weight = cov_weight
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or len(z) < 2:
            raise ValueError(f"need a (batch >= 2, dim) matrix of embeddings, got shape {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):  # fp32 even inside the forward's autocast
            z = z.float()
            z = z - z.mean(dim=0)
            std = torch.sqrt(z.var(dim=0) + self.eps)
            variance = F.relu(self.std_target - std).mean()
            n, d = z.shape
            cov = (z.T @ z) / (n - 1)
            off_diagonal = cov - torch.diag(torch.diagonal(cov))
            covariance = off_diagonal.pow(2).sum() / d
            return variance + self.cov_weight * covariance


class AntiCollapseCASSLoss(CASSLoss):
    """The CASS loss plus ``weight`` x the variance-covariance term of each network's raw embeddings.

    Opt-in (``pretrain.anti_collapse: vicreg``); an extension beyond the CASS paper.
    """

    def __init__(self, weight: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__(eps)
        self.weight = weight
        self.variance_covariance = VarianceCovarianceLoss()

    def forward(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> torch.Tensor:
        spread = self.variance_covariance(z_cnn) + self.variance_covariance(z_vit)
        return super().forward(z_cnn, z_vit) + self.weight * spread
