"""The pair CASS trains: a CNN, a ViT and the objective between their embeddings, built in one factory.

:class:`CassPair` is the narrow interface the CASS learner (:class:`cass.pretrain.CassLearner`) trains
through: how many views of an image it takes, one forward that returns the loss and the two embeddings
the collapse indicator measures, its optimiser's parameter groups, a hook after each optimiser step
(EMA targets), the backbones the stage saves, and its ``state_dict``. A variant of the objective
(projection heads, a predictor with stop-gradient, EMA targets, two views, a VICReg term) is another
``CassPair`` that :func:`build_pair` returns; the learner and the engine do not change.

A pair knows nothing of devices, precision or processes: the engine moves it, runs its forward under
autocast (losses compute in fp32 whatever autocast surrounds them), wraps it in DDP and compiles it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cass.config import Network, Params
from cass.losses import AntiCollapseCASSLoss, CASSLoss
from cass.models import create_network


class CassPair(nn.Module):
    """What the CASS learner trains. Calling the pair (as the engine's DDP and compile wrappers do) is
    :meth:`forward_loss`. Keep its state in named submodules: a checkpoint holds each under its name
    (``cnn``, ``vit``, ...) beside the optimiser's."""

    views_per_image: int = 1

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_loss(views)

    def forward_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, z_cnn, z_vit) of a batch given as ``views_per_image`` tensors of views."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (what trains, and with which per-group settings)."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """After optimiser step ``step`` (0-based) of ``total_steps``: a pair with EMA targets updates them."""

    def backbones(self) -> dict[Network, nn.Module]:
        """The CNN and the ViT, whose weights the stage saves and fine-tuning starts from."""
        raise NotImplementedError


class PaperPair(CassPair):
    """The paper's recipe: ONE view through both networks and ``2 - 2 cos`` between their embeddings
    (:class:`~cass.losses.CASSLoss`, or the opt-in :class:`~cass.losses.AntiCollapseCASSLoss`); no
    projector, predictor or momentum target. Both networks get gradients."""

    def __init__(self, cnn: nn.Module, vit: nn.Module, criterion: CASSLoss) -> None:
        super().__init__()
        self.cnn, self.vit, self.criterion = cnn, vit, criterion

    def forward_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(views) != 1:
            raise ValueError(f"the paper's CASS takes one view of each image, got {len(views)}")
        z_cnn, z_vit = self.cnn(views[0]), self.vit(views[0])
        return self.criterion(z_cnn, z_vit), z_cnn, z_vit

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.cnn.parameters())}, {"params": list(self.vit.parameters())}]

    def backbones(self) -> dict[Network, nn.Module]:
        return {"cnn": self.cnn, "vit": self.vit}


def build_pair(params: Params) -> CassPair:
    """The pair ``cass pretrain`` trains: the one place that chooses it from the settings.

    The CNN is built before the ViT, so both draw the initial weights of every earlier run of a seed."""
    m, cfg = params.model, params.pretrain
    cnn = create_network(m.cnn, m.embed_dim, "cnn", m.image_size, m.pretrained, m.cnn_weights, key="model.cnn")
    vit = create_network(m.vit, m.embed_dim, "vit", m.image_size, m.pretrained, m.vit_weights, key="model.vit")
    criterion = CASSLoss() if cfg.anti_collapse == "none" else AntiCollapseCASSLoss(cfg.anti_collapse_weight)
    return PaperPair(cnn, vit, criterion)
