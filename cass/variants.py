"""The pair of networks CASS pretrains, in the paper's recipe and in variants that do not collapse.

The paper (Singh, Sizikova & Cirrone 2022, arXiv:2206.04170) passes one view through a CNN and a ViT and
pulls their head outputs together with ``2 - 2 cos``. From ImageNet weights that trains; from random
weights the objective has a constant solution and both networks reach it within a few epochs. Each
variant is a setting (``pretrain.variant``) of this one module, built from parts of later methods:

- a projection head per network, an MLP on the pooled features that is discarded after pretraining,
  instead of pulling the classifier heads together (SimCLR, Chen et al. 2020; BYOL, Grill et al. 2020);
- two views, each network seeing its own augmentation of the image (SimSiam, Chen & He 2021; BYOL);
- a predictor on each side with stop-gradient on its target, which removes the constant fixed point
  from the dynamics (SimSiam);
- an EMA target of each network for the other one's predictor to predict (BYOL);
- and, with any of them, VICReg's variance-covariance term on each network's embeddings
  (``pretrain.anti_collapse: vicreg``; Bardes, Ponce & LeCun 2022).

==========  =====  =========  =====================  ==========
variant     views  projector  predictor + stop-grad  EMA target
==========  =====  =========  =====================  ==========
paper       1      -          -                      -
projector   2      yes        -                      -
simsiam     2      yes        yes                    -
byol        2      yes        yes                    yes
==========  =====  =========  =====================  ==========

``pretrain.cass.views`` overrides the number of views. The backbones (:meth:`CassPair.backbones`) are
the timm networks of :func:`cass.models.create_network`, saved and fine-tuned as before; projectors,
predictors and targets exist only during pretraining.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from cass.config import NETWORKS, Network, Params
from cass.config_training import CassVariant
from cass.ema import ema_update
from cass.errors import ConfigError
from cass.losses import CASSLoss, CrossPredictionLoss, VarianceCovarianceLoss
from cass.models import create_network


@dataclass(frozen=True)
class VariantSpec:
    """Which parts a variant has; ``views`` is its default number of views per image."""

    views: int
    projector: bool
    predictor: bool
    ema: bool


VARIANTS: dict[CassVariant, VariantSpec] = {  # one entry per name of config_training.CassVariant (tested)
    "paper": VariantSpec(views=1, projector=False, predictor=False, ema=False),
    "projector": VariantSpec(views=2, projector=True, predictor=False, ema=False),
    "simsiam": VariantSpec(views=2, projector=True, predictor=True, ema=False),
    "byol": VariantSpec(views=2, projector=True, predictor=True, ema=True),
}

AUTO_VARIANT: CassVariant = "paper"
"""What ``pretrain.variant: auto`` runs, from pretrained and random weights alike: the paper's recipe until the
measured decision rule of docs/baselines.md names a variant that beats no pretraining."""


def resolve_variant(params: Params) -> str:
    """The variant a run uses: ``pretrain.variant``, with ``auto`` resolved to :data:`AUTO_VARIANT`."""
    name = params.pretrain.variant
    return AUTO_VARIANT if name == "auto" else name


def choose_recipe(params: Params, data_dir: Path) -> tuple[Params, str]:
    """The settings a CASS pretraining on the prepared data in ``data_dir`` runs with, and why that recipe.

    ``pretrain.variant: auto`` follows the recommendation a ``cass study`` recorded for this data version
    (:mod:`cass.study.recommend`) when it names a CASS recipe: its variant, anti-collapse term and views.
    Otherwise :func:`resolve_variant`'s rule stands."""
    name = params.pretrain.variant
    if name != "auto":
        return params, f"pretrain.variant: {name} in the settings"
    from cass.study.recommend import lookup

    rec = lookup(params, data_dir)
    if rec is not None and rec.variant is not None:
        pre = {k.split(".", 1)[1]: v for k, v in rec.settings.items() if k.startswith("pretrain.")}
        aug = {k.split(".", 1)[1]: v for k, v in rec.settings.items() if k.startswith("augment.")}
        chosen = params.model_copy(update={"pretrain": params.pretrain.model_copy(update=pre),
                                           "augment": params.augment.model_copy(update=aug)})
        return chosen, (f"pretrain.variant: auto -> {rec.method}, recommended by `cass study` {rec.study} for this "
                        f"data version ({rec.data_hash[:12]}): {rec.reason}")
    variant = resolve_variant(params)
    why = ("no study recommendation is recorded for this data version" if rec is None else
           f"`cass study` {rec.study} recommended {rec.method} for this data version, which is not a CASS recipe")
    return params, f"pretrain.variant: auto -> {variant}, the default recipe ({why})"


class MLP(nn.Sequential):
    """Linear -> BatchNorm -> ReLU -> Linear: BYOL's projector and predictor (Grill et al. 2020).

    The output has no BatchNorm, so collapse stays visible in it (a normalised output is spread by
    construction).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class Branch(nn.Module):
    """One network as a variant trains it: the timm backbone, then the layer whose output the loss compares,
    the backbone's own head (the paper) or a projector on the pooled features. Returns (features, embedding).

    The engine's channels_last (CUDA) converts the CNN branch's weights and, by a hook on the branch, its input
    only, so a view shared with the other network is left as it is."""

    def __init__(self, backbone: nn.Module, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.backbone.forward_features(x)
        features = self.backbone.forward_head(fmap, pre_logits=True)
        if self.projector is None:
            return features, self.backbone.forward_head(fmap)  # exactly backbone(x), as the paper trains
        return features, self.projector(features)


class PairOutput(NamedTuple):
    """The loss of one batch and, per network, the embeddings the collapse indicator measures."""

    loss: torch.Tensor
    z_cnn: torch.Tensor
    z_vit: torch.Tensor


def ema_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: ``1 - (1 - base) (cos(pi step / total) + 1) / 2``, from ``base`` up to 1."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class CassPair(nn.Module):
    """A CNN and a ViT pretrained together by the CASS objective of one variant (see the module docstring).

    The training engine calls: :attr:`views` (views per image it must load), :meth:`forward_loss` (or the
    module itself, e.g. DDP-wrapped) on the device-side views, :meth:`param_groups` for its optimiser,
    :meth:`after_optimizer_step` after every optimiser step (EMA targets), :meth:`backbones` for what it
    saves, and ``state_dict``/``load_state_dict`` (every part, targets and BatchNorm statistics included)
    to resume exactly. Autocast and memory format are the engine's (:meth:`cass.engine.Engine.module` with
    ``channels_last=pair.cnn`` converts the CNN branch and its input only).

    The embeddings returned for the collapse indicator are each network's projection (or, in the paper's
    recipe, head output): the vectors the objective pulls together, so the ones it can collapse (the
    projector ends without BatchNorm, which would keep them spread by construction); their width is
    :meth:`embedding_dims`. Backbone features are not used for it: measured from random initialisation
    (test networks, demo images), the ViT's pooled features start near 0.3 x 1/sqrt(dim) (one dominant
    class-token direction) and the CNN's pooled ReLU features stay near 0.8 x while its head collapses in
    the paper's recipe, so an indicator on them would both raise false alarms and miss the collapse. The
    kNN monitor (cass.monitor) judges the kept backbones directly, by what they are for.

    >>> import timm
    >>> cnn = timm.create_model("test_resnet", num_classes=16)
    >>> vit = timm.create_model("test_vit", num_classes=16, img_size=32)
    >>> pair = CassPair(cnn, vit, "simsiam", projector_dim=16)
    >>> views = [torch.randn(4, 3, 32, 32) for _ in range(pair.views)]
    >>> loss, z_cnn, z_vit = pair.forward_loss(views)
    >>> z_cnn.shape == z_vit.shape == (4, 16)
    True
    """

    def __init__(
        self,
        cnn: nn.Module,
        vit: nn.Module,
        variant: str = "paper",
        *,
        views: int | None = None,
        projector_dim: int | None = None,
        projector_hidden_dim: int = 512,
        predictor_hidden_dim: int = 128,
        ema_momentum: float = 0.99,
        vicreg_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            known = ", ".join(VARIANTS)
            raise ConfigError(f"pretrain.variant: unknown CASS variant {variant!r}; choose one of {known}")
        spec = VARIANTS[variant]
        self.variant, self.spec = variant, spec
        self.views = spec.views if views is None else views
        if self.views not in (1, 2):
            raise ConfigError(f"pretrain.cass.views must be 1 or 2, got {self.views}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ConfigError(f"pretrain.cass.ema_momentum must lie in [0, 1], got {ema_momentum}")
        if vicreg_weight < 0:
            raise ConfigError(f"pretrain.anti_collapse_weight must be >= 0, got {vicreg_weight}")
        self.ema_base = ema_momentum
        self.vicreg_weight = vicreg_weight
        dim = projector_dim or int(getattr(cnn, "num_classes", 0)) or None
        if spec.projector and not dim:
            raise ConfigError("pretrain.cass.projector_dim is needed: the CNN has no head width to default to")
        branches: dict[str, Branch] = {}
        for name, backbone in (("cnn", cnn), ("vit", vit)):
            projector = None
            if spec.projector:
                projector = MLP(int(backbone.num_features), projector_hidden_dim, dim)
                backbone.get_classifier().requires_grad_(False)  # the embedding head is not trained here
            branches[name] = Branch(backbone, projector)
        self.cnn, self.vit = branches["cnn"], branches["vit"]
        self.cnn_predictor: nn.Module | None = None
        self.vit_predictor: nn.Module | None = None
        if spec.predictor:
            self.cnn_predictor = MLP(dim, predictor_hidden_dim, dim)
            self.vit_predictor = MLP(dim, predictor_hidden_dim, dim)
        self.cnn_target: nn.Module | None = None
        self.vit_target: nn.Module | None = None
        if spec.ema:
            self.cnn_target = copy.deepcopy(self.cnn).requires_grad_(False)
            self.vit_target = copy.deepcopy(self.vit).requires_grad_(False)
        self.invariance = CASSLoss()
        self.prediction = CrossPredictionLoss()
        self.variance_covariance = VarianceCovarianceLoss()

    @classmethod
    def from_params(cls, params: Params) -> CassPair:
        """Both networks built as CASS pretraining always built them (same factory, keys and head width,
        so the saved backbones load into fine-tuning), then the parts of the resolved variant."""
        m, cfg = params.model, params.pretrain
        cnn = create_network(m.cnn, m.embed_dim, "cnn", m.image_size, m.pretrained, m.cnn_weights, key="model.cnn")
        vit = create_network(m.vit, m.embed_dim, "vit", m.image_size, m.pretrained, m.vit_weights, key="model.vit")
        c = cfg.cass
        return cls(
            cnn,
            vit,
            resolve_variant(params),
            views=c.views,
            projector_dim=c.projector_dim or m.embed_dim,
            projector_hidden_dim=c.projector_hidden_dim,
            predictor_hidden_dim=c.predictor_hidden_dim,
            ema_momentum=c.ema_momentum,
            vicreg_weight=cfg.anti_collapse_weight if cfg.anti_collapse == "vicreg" else 0.0,
        )

    def forward(self, views: torch.Tensor | Sequence[torch.Tensor]) -> PairOutput:
        """The loss of one batch: ``views`` is one batch tensor (one view) or a list of :attr:`views` of them;
        with two, the CNN sees the first and the ViT the second."""
        views = [views] if isinstance(views, torch.Tensor) else list(views)
        if len(views) != self.views:
            raise ValueError(
                f"CASS variant {self.variant!r} takes {self.views} view(s) per image (pretrain.cass.views), "
                f"got {len(views)}"
            )
        x_cnn, x_vit = views[0], views[-1]
        _, z_cnn = self.cnn(x_cnn)
        _, z_vit = self.vit(x_vit)
        if self.cnn_predictor is not None and self.vit_predictor is not None:
            t_cnn, t_vit = z_cnn, z_vit  # SimSiam: the other network's projection, stop-gradient in the loss
            if self.cnn_target is not None and self.vit_target is not None:
                with torch.no_grad():  # BYOL: the other network's EMA copy
                    t_cnn = self.cnn_target(x_cnn)[1]
                    t_vit = self.vit_target(x_vit)[1]
            loss = self.prediction(self.cnn_predictor(z_cnn), t_vit, self.vit_predictor(z_vit), t_cnn)
        else:
            loss = self.invariance(z_cnn, z_vit)
        if self.vicreg_weight > 0:
            loss = loss + self.vicreg_weight * (self.variance_covariance(z_cnn) + self.variance_covariance(z_vit))
        return PairOutput(loss, z_cnn, z_vit)

    def forward_loss(self, views: torch.Tensor | Sequence[torch.Tensor]) -> PairOutput:
        """``(loss, z_cnn, z_vit)`` of one batch (see :meth:`forward`)."""
        return self(views)

    def embedding_dims(self) -> dict[Network, int]:
        """Width of each network's ``z`` (the collapse indicator's healthy value is ``dim ** -0.5``)."""
        return {name: self._embedding_dim(getattr(self, name)) for name in NETWORKS}

    @staticmethod
    def _embedding_dim(branch: Branch) -> int:
        if branch.projector is not None:
            return int(branch.projector[-1].out_features)
        return int(branch.backbone.num_classes)

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimiser group per network: its backbone, projector and predictor (never a target, nor a
        head the variant does not train). In the paper's recipe, exactly each backbone's parameters."""
        groups = []
        for name in NETWORKS:
            modules = [getattr(self, name), getattr(self, f"{name}_predictor")]
            params = [p for mod in modules if mod is not None for p in mod.parameters() if p.requires_grad]
            groups.append({"params": params, "name": name})
        return groups

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """After optimiser step ``step`` (0-based) of ``total_steps``: move the EMA targets (BYOL) towards the
        online networks, with a momentum that depends on the step alone (so a resumed run does the same)."""
        if self.cnn_target is None or self.vit_target is None:
            return
        momentum = ema_momentum(self.ema_base, step, total_steps)
        ema_update(self.cnn_target, self.cnn, momentum)
        ema_update(self.vit_target, self.vit, momentum)

    def backbones(self) -> dict[Network, nn.Module]:
        """The networks that pretraining keeps (``cnn.safetensors``, ``vit.safetensors``)."""
        return {"cnn": self.cnn.backbone, "vit": self.vit.backbone}


def build_pair(params: Params) -> CassPair:
    """The pair ``cass pretrain`` trains: the one place that chooses it from the settings (the resolved
    ``pretrain.variant``, see :func:`resolve_variant`). The CNN is built before the ViT and the variant's parts
    after both, so the paper's recipe draws the initial weights of every earlier run of a seed."""
    return CassPair.from_params(params)
