"""CASS vs DINO pretraining time per image, side by side on one device, in one run.

Both methods use the same backbones (built by ``cass.models.create_network``), batch size, image size
and precision. Timed: one optimiser step each, on synthetic batches already on the device (the data
pipeline is measured by data_pipeline.py):
  - CASS: one view through the CNN and the ViT, loss, backward, one optimiser step for both
    (``cass.cass_pretraining.CassLearner``'s ``step`` + ``optimizer_step``, what the CASS stage runs);
  - DINO, per network: student on 2 global + N local crops, teacher on the 2 global crops, centring,
    backward, clipping, AdamW step, EMA update (``cass.baselines.dino.DinoLearner``).
CASS produces a pretrained CNN and ViT in one step; DINO needs one run per network, so the headline
ratio is CASS / (DINO-CNN + DINO-ViT). The paper's own comparison (DINO on one ViT) is printed too.

The engine's overhead, in the same run: ``engine`` is one batch as the pretrain stage's loop takes it
(``Engine.train_batch``: to the device, ``CassLearner.step``, the finiteness check, the optimiser step, the
epoch's loss sums and collapse statistics), ``bare`` a notebook-style step written here: copies of the
same two networks (same initial weights, same batch), ``2 - 2 cos`` of their outputs, ``zero_grad``,
``backward``, Adam's step; both follow the same trajectory (the largest difference of their losses is printed).
``ratio_engine_speed_over_bare`` is bare seconds / engine seconds (1.0: the engine costs nothing per step).
Steps are timed round-robin; the median of the measured rounds is reported. ``--parity-only`` skips DINO.

    python benchmarks/pretrain_step.py              # CPU: resnet18 + vit_tiny_patch16_224 at 64 px
    python benchmarks/pretrain_step.py --gpu        # resnet50 + vit_base_patch16_224 at 224 px
    python benchmarks/pretrain_step.py --parity-only --steps 20   # engine vs bare step only
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import (
    add_speed_arguments,
    cass_step_fn,
    dino_local_size,
    dino_step_fn,
    emit,
    interleaved_times,
    median,
    speed_setup,
    spread,
    step_params,
)

TARGET = 0.35
PARITY_TARGET = 1.0


class Parity:
    """The engine's step and a bare step of the same two networks from the same initial weights, on the same
    batch: they do the same arithmetic, so they follow the same trajectory (their losses are compared, and the
    values the networks reach, which can slow float arithmetic down, are the same for both)."""

    def __init__(self, params) -> None:
        from cass.cass_pretraining import CassLearner
        from cass.engine import Engine, EpochMeter

        m, cfg = params.model, params.pretrain
        self.engine = Engine(cfg, seed=0, key="pretrain")
        self.learner = CassLearner(params, self.engine)
        self.learner.start_epoch(0)
        self.cnn, self.vit = (copy.deepcopy(b).train() for b in self.learner.backbones().values())
        self.x = torch.randn(cfg.batch_size, 3, m.image_size, m.image_size, device=self.engine.device)
        self.batch = (self.x, torch.full((cfg.batch_size,), -1, device=self.engine.device))
        self.meter, self.lr = EpochMeter(self.engine.device), cfg.lr
        self.optimizer = torch.optim.Adam([*self.cnn.parameters(), *self.vit.parameters()], lr=cfg.lr)
        self.losses: dict[str, list[float]] = {"engine": [], "bare": []}

    def engine_step(self) -> None:
        """One batch through ``Engine.train_batch`` with the CASS learner, as the pretrain stage's loop runs it."""
        from cass.engine import Step

        out = self.engine.train_batch(self.learner, self.batch, Step(lr=self.lr), self.meter)
        self.losses["engine"].append(out.losses["loss"])

    def bare_step(self) -> None:
        """A notebook-style CASS step: both networks, ``2 - 2 cos`` of their outputs, zero_grad, backward, Adam."""
        import torch.nn.functional as F

        loss = (2 - 2 * (F.normalize(self.cnn(self.x), dim=-1) * F.normalize(self.vit(self.x), dim=-1)).sum(-1)).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses["bare"].append(loss.detach())

    def largest_loss_difference(self) -> float:
        return max(abs(float(a) - float(b)) for a, b in zip(*self.losses.values(), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(ap)
    ap.add_argument("--embed-dim", type=int, default=1000, help="CASS embedding width (paper: 1000)")
    ap.add_argument("--local-crops", type=int, default=8, help="DINO local crops (official: 8)")
    ap.add_argument("--out-dim", type=int, help="DINO head output (official 65536; CPU default 4096)")
    ap.add_argument("--warmup", type=int, default=5, help="rounds discarded before measuring")
    ap.add_argument("--steps", type=int, default=30, help="measured rounds (one step of each method per round)")
    ap.add_argument("--parity-only", action="store_true", help="time only the engine's step against the bare one")
    args = ap.parse_args()
    run = speed_setup(args)
    cnn, vit, image_size, batch = run.cnn, run.vit, run.image_size, run.batch
    device, precision, env = run.device, run.precision, run.env
    out_dim = args.out_dim or (65536 if args.gpu else 4096)
    params = step_params(
        cnn, vit, image_size, batch, embed_dim=args.embed_dim, precision=args.precision, device=args.device,
        local_crops=args.local_crops, out_dim=out_dim,
    )
    torch.manual_seed(0)
    parity = Parity(params)
    steps = {"bare": parity.bare_step, "engine": parity.engine_step}
    if not args.parity_only:
        steps |= {
            "cass": cass_step_fn(params),
            "dino_cnn": dino_step_fn(params, "cnn", device, precision),
            "dino_vit": dino_step_fn(params, "vit", device, precision),
        }
    times = interleaved_times(steps, device, args.warmup, args.steps)
    per_image = {k: median(v) / batch for k, v in times.items()}
    speed = per_image["bare"] / per_image["engine"]
    figures = {}
    if not args.parity_only:
        per_image["dino_both"] = per_image["dino_cnn"] + per_image["dino_vit"]
        ratio = per_image["cass"] / per_image["dino_both"]
        figures = {
            "ratio_cass_over_dino": ratio,
            "ratio_cass_over_dino_vit_only": per_image["cass"] / per_image["dino_vit"],
            "target": f"ratio_cass_over_dino <= {TARGET}",
            "target_met": ratio <= TARGET,
        }
    emit({
        "benchmark": "pretrain_step",
        "settings": {
            "cnn": cnn, "vit": vit, "image_size": image_size, "batch_size": batch, "precision": precision.name,
            "embed_dim": args.embed_dim, "dino_global_crops": 2, "dino_local_crops": args.local_crops,
            "dino_local_crop_size": dino_local_size(params), "dino_out_dim": out_dim,
            "warmup_rounds": args.warmup, "measured_rounds": args.steps,
        },
        "seconds_per_image": per_image,
        "images_per_second": {k: 1.0 / v for k, v in per_image.items()},
        "step_seconds": {k: spread(v) for k, v in times.items()},
        "ratio_engine_speed_over_bare": speed,
        "largest_loss_difference_engine_vs_bare": parity.largest_loss_difference(),
        "ratio_engine_speed_over_bare_per_round": [round(b / e, 3) for b, e in
                                                   zip(times["bare"], times["engine"], strict=True)],
        "parity_target": f"ratio_engine_speed_over_bare >= {PARITY_TARGET} (within noise)",
        **figures,
        **env,
    })


if __name__ == "__main__":
    main()
