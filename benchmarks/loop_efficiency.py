"""CASS training throughput against its ceiling 1 / (1/T_cnn + 1/T_vit).

T_cnn and T_vit are the training throughputs (images/s: forward, backward, optimiser step) of each
network alone on the same device, batch, image size and precision. A CASS step runs both networks on the
same images, so it can at best reach that ceiling; the ratio says how much the CASS loop loses on top.
Two CASS figures are reported:
  - step_efficiency: the CASS step (``CassLearner.step`` + ``optimizer_step``) on a synthetic batch;
  - loop_efficiency (headline): the ``pretrain`` stage's training loop itself (DataLoader with decoding
    and augmentation at the stage's worker count, learning-rate schedule, loss and collapse statistics,
    logging), images/s of each epoch after the first as the stage records it (the checkpoint written
    between epochs is not part of an epoch), on the demo dataset.
The ceiling is measured in rounds (one step of each network alone and one CASS step per round) before
the stage and after each of its epochs; each epoch is divided by the ceiling of the rounds on either
side of it, and the median over epochs is reported, so a change in background load during the run
moves both sides of the ratio alike.

    python benchmarks/loop_efficiency.py            # CPU: resnet18 + vit_tiny_patch16_224 at 64 px
    python benchmarks/loop_efficiency.py --gpu      # resnet50 + vit_base_patch16_224 at 224 px
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from _common import (
    add_speed_arguments,
    cass_step_fn,
    demo_mapping,
    emit,
    interleaved_times,
    log,
    median,
    prepare_demo,
    single_network_step_fn,
    speed_setup,
    spread,
    step_params,
    with_changes,
)

from cass.training import resolve_num_workers

TARGET = 0.85


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(ap)
    ap.add_argument("--embed-dim", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=5, help="step rounds discarded before the stage")
    ap.add_argument("--rounds", type=int, default=6, help="step rounds before the stage and after each epoch")
    ap.add_argument("--epochs", type=int, default=6, help="stage epochs; the first is discarded as warm-up")
    ap.add_argument("--images-per-class", type=int, default=100, help="demo dataset size (4 classes)")
    ap.add_argument("--num-workers", default="auto",
                    help="DataLoader workers of the stage: a number, or auto as in params.yaml (0 on a CPU)")
    ap.add_argument("--work", type=Path, help="folder for the demo data and stage outputs (default: a temp dir)")
    args = ap.parse_args()
    run = speed_setup(args)
    cnn, vit, image_size, batch = run.cnn, run.vit, run.image_size, run.batch
    device, precision, env = run.device, run.precision, run.env
    params = step_params(cnn, vit, image_size, batch, embed_dim=args.embed_dim, precision=args.precision,
                         device=args.device)
    torch.manual_seed(0)
    steps = {
        "cnn_alone": single_network_step_fn(params, "cnn", device, precision),
        "vit_alone": single_network_step_fn(params, "vit", device, precision),
        "cass_step": cass_step_fn(params),
    }
    # The ceiling is measured between the stage's epochs (a callback after each one), and each epoch is
    # compared with the step rounds on either side of it: a change in background load moves both alike.
    gaps: list[dict[str, list[float]]] = [interleaved_times(steps, device, args.warmup, args.rounds)]

    def measure_ceiling(epoch: int, _metrics: object) -> None:
        gaps.append(interleaved_times(steps, device, 0, args.rounds))

    workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    with tempfile.TemporaryDirectory(prefix="cass-loop-") as tmp:
        work = args.work or Path(tmp)
        raw = demo_mapping(work / "demo", images_per_class=args.images_per_class, image_size=image_size, cnn=cnn,
                           vit=vit)
        data_dir = prepare_demo(raw, work)
        stage = with_changes(raw, {
            "model.embed_dim": args.embed_dim,
            "pretrain.batch_size": batch,
            "pretrain.epochs": args.epochs,
            "pretrain.num_workers": workers,
            "pretrain.precision": args.precision,
            "pretrain.device": args.device,
        })
        from cass.cass_pretraining import pretrain

        log.info("running the pretrain stage for %d epochs, %d step rounds after each", args.epochs, args.rounds)
        out = pretrain(stage, data_dir, work / "pretrain", resume=False, progress=False, callbacks=[measure_ceiling])
        history = pd.read_csv(out.history).to_dict("records")
        images = json.loads(out.metrics.read_text())["images"]

    def ceiling_of(times: dict[str, list[float]]) -> float:
        return 1.0 / (median(times["cnn_alone"]) / batch + median(times["vit_alone"]) / batch)

    epochs = []
    for e, record in enumerate(history):  # epoch e + 1 ran between gaps[e] and gaps[e + 1]
        around = {k: gaps[e][k] + gaps[e + 1][k] for k in steps}
        ceiling_e = ceiling_of(around)
        epochs.append({
            "epoch": e + 1,
            "stage_images_per_second": record["images_per_second"],
            "ceiling": ceiling_e,
            "cass_step": batch / median(around["cass_step"]),
            "loop_efficiency": record["images_per_second"] / ceiling_e,
        })
    steady = epochs[1:] or epochs  # the first epoch starts the loader's workers and warms the caches
    loop_efficiency = median([r["loop_efficiency"] for r in steady])
    times = {k: [t for g in gaps for t in g[k]] for k in steps}
    throughput = {k: batch / median(v) for k, v in times.items()}
    ceiling = ceiling_of(times)
    emit({
        "benchmark": "loop_efficiency",
        "settings": {
            "cnn": cnn, "vit": vit, "image_size": image_size, "batch_size": batch, "precision": precision.name,
            "embed_dim": args.embed_dim, "stage_epochs": args.epochs, "stage_images": images,
            "stage_num_workers": f"{workers} = {resolve_num_workers(workers, device)}",
            "warmup_rounds": args.warmup, "rounds_between_epochs": args.rounds,
        },
        "images_per_second": {
            **throughput, "ceiling": ceiling, "cass_stage_loop": median([r["stage_images_per_second"] for r in steady]),
        },
        "epochs": epochs,
        "step_seconds": {k: spread(v) for k, v in times.items()},
        "step_efficiency": median([r["cass_step"] / r["ceiling"] for r in steady]),
        "loop_efficiency": loop_efficiency,
        "loop_efficiency_range": [min(r["loop_efficiency"] for r in steady), max(r["loop_efficiency"] for r in steady)],
        "target": f"loop_efficiency >= {TARGET}",
        "target_met": loop_efficiency >= TARGET,
        **env,
    })


if __name__ == "__main__":
    main()
