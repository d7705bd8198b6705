"""Stage ``pretrain``: CASS self-supervised pretraining of a CNN and a ViT together.

In the paper's recipe (``pretrain.variant: paper``) every batch is ONE augmented view; it goes through both
networks, and the loss ``2 - 2 cos`` between their embeddings trains both. The other variants (projectors,
two views, predictors with stop-gradient, EMA targets; :mod:`cass.variants`) are other settings of the same
pair, built by :func:`cass.variants.build_pair`; the learner and the loop do not change. Labels are not used,
and every unlabelled training image is used (not only the label-fraction subset). Gradients are zeroed after
every optimiser step. The engine (:mod:`cass.engine`) runs the loop; ``pretrain.method: dino`` runs the DINO
baseline's learner instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cass.baselines.dino import DinoPretraining
from cass.config import Network, Params
from cass.data.transforms import pretrain_transform
from cass.engine import Engine, EpochStats, Step, StepOutput
from cass.outputs import PretrainOutputs
from cass.pretraining_common import PretrainingLearner, run_pretraining
from cass.training import EpochCallback, make_optimizer
from cass.variants import CassPair, build_pair, choose_recipe

log = logging.getLogger(__name__)

RESERVED_PARTS = ("optimizer", "scaler", "knn_start")


def pair_parts(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A pair's flat state_dict as one state_dict per submodule (``cnn``, ``vit``, ...): the checkpoint
    layout of every CASS run, so checkpoints of earlier versions still resume."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if not rest or part in RESERVED_PARTS:
            raise ValueError(f"pair state '{key}' is not in a submodule, or in one named like {RESERVED_PARTS}")
        parts.setdefault(part, {})[rest] = value
    return parts


class CassLearner(PretrainingLearner):
    """CASS: one optimiser over the pair's parameter groups; each step is the pair's loss of a batch."""

    method = "cass"
    name = "CASS pretraining"
    epoch_log = (
        "pretrain epoch %d/%d: loss %.4f, embedding std CNN %.4f / ViT %.4f (healthy %.4f), %.0f img/s",
        ("loss", "cnn_embedding_std", "vit_embedding_std", "healthy_embedding_std", "images_per_second"),
    )

    def __init__(self, params: Params, engine: Engine, why: str = "") -> None:
        super().__init__(params, engine)
        self.why = why  # why this recipe (cass.variants.choose_recipe), in networks.json
        cfg = params.pretrain
        pair = build_pair(params)
        self.pair: CassPair
        self.pair, self._forward = engine.module(pair, channels_last=pair.cnn, sync_batchnorm=cfg.sync_batchnorm)
        self.updater = engine.updater(make_optimizer(cfg, self.pair.param_groups()))
        self.peak_lr = cfg.lr
        self.transform = pretrain_transform(params.model.image_size, params.augment, self.pair.views)

    @staticmethod
    def checkpoint_path(out: PretrainOutputs) -> Path:
        return out.checkpoint

    def announce(self, images: int) -> None:
        m = self.params.model
        log.info("CASS pretraining (variant %s, %d view(s), %s views): %s + %s, %d images, %s", self.pair.variant,
                 self.pair.views, self.params.augment.recipe, m.cnn, m.vit, images, self.engine.describe())

    @property
    def collapse_hint(self) -> str:
        if self.pair.variant == "paper":
            alternative = "pretrain.variant: simsiam with pretrain.anti_collapse: vicreg (the best measured)"
            return (f"From random weights the paper's recipe tends to collapse: set {alternative} to keep the "
                    f"embeddings spread (docs/baselines.md: what each gains), or start from pretrained weights "
                    f"(model.pretrained or *_weights).")
        return (f"Variant {self.pair.variant} collapsed: try another pretrain.variant or add "
                f"pretrain.anti_collapse: vicreg (docs/baselines.md).")

    def recipe(self) -> dict[str, Any]:
        cfg = self.params.pretrain
        return {"variant": self.pair.variant, "views": self.pair.views, "augment_recipe": self.params.augment.recipe,
                "anti_collapse": cfg.anti_collapse,
                **({"anti_collapse_weight": cfg.anti_collapse_weight} if cfg.anti_collapse != "none" else {}),
                **({"variant_reason": self.why} if self.why else {})}

    def start_epoch(self, epoch: int) -> None:
        self.pair.train()

    def step(self, batch: Any, step: Step) -> StepOutput:
        views = batch[0] if isinstance(batch[0], list) else [batch[0]]
        with self.engine.autocast():
            loss, z_cnn, z_vit = self._forward(views)
        self.updater.backward(loss, step.divisor)
        return StepOutput({"loss": loss}, {"cnn": z_cnn, "vit": z_vit})

    def optimizer_step(self, step: Step) -> None:
        self.updater.step(step.lr)
        self.pair.after_optimizer_step(step.index, self.engine.total_steps)

    def record(self, stats: EpochStats) -> dict[str, float]:
        return {
            "epoch": stats.epoch,
            "loss": stats.losses["loss"],
            "lr": stats.lr,
            "cnn_embedding_std": stats.spread["cnn"],
            "vit_embedding_std": stats.spread["vit"],
            "healthy_embedding_std": stats.healthy["cnn"],  # both networks embed into model.embed_dim
            "images_per_second": stats.images_per_second,
            "epoch_seconds": stats.seconds,
        }

    def details(self, last: Mapping[str, float]) -> dict[str, Any]:
        return {"healthy_embedding_std": last["healthy_embedding_std"]}

    def backbones(self) -> dict[Network, torch.nn.Module]:
        return self.pair.backbones()

    def state_dict(self) -> dict[str, Any]:
        return {**pair_parts(self.pair.state_dict()), **self.updater.state_dict(), **self.monitor_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        flat = {}
        for part, expected in pair_parts(self.pair.state_dict()).items():
            saved = state[part]
            if "backbone." + next(iter(saved), "") in expected:
                saved = {f"backbone.{k}": v for k, v in saved.items()}  # before the variants: the bare network
            flat.update({f"{part}.{k}": v for k, v in saved.items()})
        self.pair.load_state_dict(flat)
        self.updater.load_state_dict(state)
        self.load_monitor_state(state)


def pretrain(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    *,
    resume: bool = True,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
) -> PretrainOutputs:
    """Train both networks with the CASS objective; returns where the weights and metrics are.

    ``pretrain.method: dino`` runs the DINO baseline instead (same outputs; see cass.baselines.dino)."""
    learner: Callable[[Params, Engine], PretrainingLearner] = DinoPretraining
    if params.pretrain.method == "cass":  # pretrain.variant: auto follows a study's recommendation for this data
        params, why = choose_recipe(params, Path(data_dir))
        learner = functools.partial(CassLearner, why=why)
    return run_pretraining(params, data_dir, out_dir, learner, resume=resume, callbacks=callbacks, progress=progress)
