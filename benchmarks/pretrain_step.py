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
Steps are timed round-robin; the median of the measured rounds is reported.

    python benchmarks/pretrain_step.py              # CPU: resnet18 + vit_tiny_patch16_224 at 64 px
    python benchmarks/pretrain_step.py --gpu        # resnet50 + vit_base_patch16_224 at 224 px
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(ap)
    ap.add_argument("--embed-dim", type=int, default=1000, help="CASS embedding width (paper: 1000)")
    ap.add_argument("--local-crops", type=int, default=8, help="DINO local crops (official: 8)")
    ap.add_argument("--out-dim", type=int, help="DINO head output (official 65536; CPU default 4096)")
    ap.add_argument("--warmup", type=int, default=5, help="rounds discarded before measuring")
    ap.add_argument("--steps", type=int, default=30, help="measured rounds (one step of each method per round)")
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
    steps = {
        "cass": cass_step_fn(params),
        "dino_cnn": dino_step_fn(params, "cnn", device, precision),
        "dino_vit": dino_step_fn(params, "vit", device, precision),
    }
    times = interleaved_times(steps, device, args.warmup, args.steps)
    per_image = {k: median(v) / batch for k, v in times.items()}
    per_image["dino_both"] = per_image["dino_cnn"] + per_image["dino_vit"]
    ratio = per_image["cass"] / per_image["dino_both"]
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
        "ratio_cass_over_dino": ratio,
        "ratio_cass_over_dino_vit_only": per_image["cass"] / per_image["dino_vit"],
        "target": f"ratio_cass_over_dino <= {TARGET}",
        "target_met": ratio <= TARGET,
        **env,
    })


if __name__ == "__main__":
    main()
