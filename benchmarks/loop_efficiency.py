"""CASS training throughput against its ceiling 1 / (1/T_cnn + 1/T_vit).

T_cnn and T_vit are the training throughputs (images/s: forward, backward, optimiser step) of each
network alone on the same device, batch, image size and precision. A CASS step runs both networks on the
same images, so it can at best reach that ceiling; the ratio says how much the CASS loop loses on top.
Two CASS figures are reported:
  - step_efficiency: the CASS step (``cass_step`` + ``optimizer_step``) on a synthetic batch;
  - loop_efficiency (headline): the ``pretrain`` stage itself, end to end (DataLoader with decoding and
    augmentation, logging, collapse statistics, checkpoints), on the demo dataset, epochs after the first.

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
    CPU_PRESET,
    GPU_PRESET,
    add_threads_argument,
    apply_threads,
    cass_step_fn,
    demo_mapping,
    emit,
    environment,
    interleaved_times,
    log,
    median,
    prepare_demo,
    setup_logging,
    single_network_step_fn,
    spread,
    step_params,
    with_changes,
)

from cass.training import resolve_device, resolve_precision

TARGET = 0.85


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU preset: resnet50 + vit_base_patch16_224, 224 px, batch 32")
    ap.add_argument("--cnn")
    ap.add_argument("--vit")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--embed-dim", type=int, default=1000)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=3, help="stage epochs; the first is discarded as warm-up")
    ap.add_argument("--images-per-class", type=int, default=100, help="demo dataset size (4 classes)")
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the stage (params.yaml: 2)")
    ap.add_argument("--work", type=Path, help="folder for the demo data and stage outputs (default: a temp dir)")
    add_threads_argument(ap)
    args = ap.parse_args()
    setup_logging()
    apply_threads(args.threads)

    preset = GPU_PRESET if args.gpu else CPU_PRESET
    cnn, vit = args.cnn or preset["cnn"], args.vit or preset["vit"]
    image_size, batch = args.image_size or preset["image_size"], args.batch_size or preset["batch_size"]
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    params = step_params(cnn, vit, image_size, batch, embed_dim=args.embed_dim, precision=args.precision,
                         device=args.device)
    torch.manual_seed(0)
    steps = {
        "cnn_alone": single_network_step_fn(params, "cnn", device, precision),
        "vit_alone": single_network_step_fn(params, "vit", device, precision),
        "cass_step": cass_step_fn(params, device, precision),
    }
    # Half of the step rounds before the stage and half after, so a change in background load during the
    # run moves the ceiling and the stage alike.
    times = interleaved_times(steps, device, args.warmup, args.steps - args.steps // 2)

    with tempfile.TemporaryDirectory(prefix="cass-loop-") as tmp:
        work = args.work or Path(tmp)
        raw = demo_mapping(work / "demo", images_per_class=args.images_per_class, image_size=image_size, cnn=cnn,
                           vit=vit)
        data_dir = prepare_demo(raw, work)
        stage = with_changes(raw, {
            "model.embed_dim": args.embed_dim,
            "pretrain.batch_size": batch,
            "pretrain.epochs": args.epochs,
            "pretrain.num_workers": args.num_workers,
            "pretrain.precision": args.precision,
            "pretrain.device": args.device,
        })
        from cass.pretrain import pretrain

        log.info("running the pretrain stage for %d epochs", args.epochs)
        out = pretrain(stage, data_dir, work / "pretrain", resume=False, progress=False)
        history = pd.read_csv(out.history).to_dict("records")
        images = json.loads(out.metrics.read_text())["images"]
    after = interleaved_times(steps, device, 1, args.steps // 2)
    times = {k: v + after[k] for k, v in times.items()}
    throughput = {k: batch / median(v) for k, v in times.items()}
    ceiling = 1.0 / (1.0 / throughput["cnn_alone"] + 1.0 / throughput["vit_alone"])
    steady = [h["images_per_second"] for h in history[1:]] or [history[0]["images_per_second"]]
    loop = median(steady)
    emit({
        "benchmark": "loop_efficiency",
        "settings": {
            "cnn": cnn, "vit": vit, "image_size": image_size, "batch_size": batch, "precision": precision.name,
            "embed_dim": args.embed_dim, "stage_epochs": args.epochs, "stage_images": images,
            "stage_num_workers": args.num_workers, "warmup_rounds": args.warmup, "measured_rounds": args.steps,
        },
        "images_per_second": {**throughput, "ceiling": ceiling, "cass_stage_loop": loop},
        "stage_epoch_images_per_second": [h["images_per_second"] for h in history],
        "step_seconds": {k: spread(v) for k, v in times.items()},
        "step_efficiency": throughput["cass_step"] / ceiling,
        "loop_efficiency": loop / ceiling,
        "target": f"loop_efficiency >= {TARGET}",
        "target_met": loop / ceiling >= TARGET,
        **env,
    })


if __name__ == "__main__":
    main()
