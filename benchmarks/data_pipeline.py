"""Training DataLoader throughput (decode + CASS augmentations) vs raw decoding, vs what the model consumes.

For each worker count (0 = in the main process, 1, 2, and the default, ``pretrain.num_workers: auto``
resolved for the device: 0 on a CPU, the spare cores on a GPU) it measures, over the same files:
  - raw decode: the image file to an 8-bit RGB tensor, nothing else;
  - the CASS training loader: the ``ImageDataset`` + ``cass_transform`` + ``EpochLoader`` the pretrain
    stage builds (decode, resize, colour jitter, perspective, affine, flips, normalisation, batching);
  - the DINO loader (2 global + 8 local crops per image), for reference.
Throughput counts whole epochs of one loader whose workers live across epochs, as in the stage (their
start-up falls in the first epoch); ``steady`` leaves out each epoch's first batch. The model's
consumption rate is the CASS training step (both networks) on the same device; the target is
loader >= 1.2 x model at the default worker count.

    python benchmarks/data_pipeline.py              # demo data at 64 px, model resnet18 + vit_tiny
    python benchmarks/data_pipeline.py --gpu        # demo data at 224 px, model resnet50 + ViT-B/16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    add_speed_arguments,
    cass_step_fn,
    demo_mapping,
    dino_local_size,
    emit,
    interleaved_times,
    log,
    median,
    prepare_demo,
    speed_setup,
    step_params,
)
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2

from cass.config import AugmentConfig, DinoConfig
from cass.data.dataset import EpochLoader, ImageDataset
from cass.data.manifest import read_manifest
from cass.data.transforms import MultiCropTransform, cass_transform
from cass.training import resolve_num_workers

TARGET = 1.2


def measure(make: Callable[[int], DataLoader], min_images: int) -> dict[str, float]:
    """Iterate whole epochs until ``min_images`` images went through; images/s with and without the
    first batch of each epoch (worker start-up)."""
    images = steady_images = 0
    seconds = steady_seconds = 0.0
    epoch = 0
    while images < min_images:
        loader = make(epoch)
        t0 = time.perf_counter()
        first = None
        for batch in loader:
            n = len(batch[0]) if not isinstance(batch[0], list) else len(batch[0][0])
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                steady_images += n
            images += n
        end = time.perf_counter()
        seconds += end - t0
        steady_seconds += end - (first or end)
        epoch += 1
    steady = steady_images / max(steady_seconds, 1e-9)
    return {"images_per_second": images / seconds, "steady_images_per_second": steady}


def _decode_collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(ap)
    ap.add_argument("--workers", default="0,1,2", help="worker counts to measure (default: %(default)s)")
    ap.add_argument("--default-workers", default="auto",
                    help="the stage's worker count (params.yaml: auto, resolved for the device)")
    ap.add_argument("--images-per-class", type=int, default=100, help="demo dataset size (4 classes)")
    ap.add_argument("--min-images", type=int, default=600, help="images per measurement, whole epochs")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per setting (median reported)")
    ap.add_argument("--data-dir", type=Path, help="a prepared data folder to read instead of the demo dataset")
    ap.add_argument("--steps", type=int, default=30, help="measured model steps")
    ap.add_argument("--skip-dino", action="store_true", help="do not measure the DINO multi-crop loader")
    args = ap.parse_args()
    run = speed_setup(args)
    cnn, vit, image_size, batch = run.cnn, run.vit, run.image_size, run.batch
    device, precision, env = run.device, run.precision, run.env
    default_workers = resolve_num_workers(args.default_workers if args.default_workers == "auto"
                                          else int(args.default_workers), device)
    workers = sorted({int(w) for w in args.workers.split(",")} | {default_workers})
    pin = device.type == "cuda"

    with tempfile.TemporaryDirectory(prefix="cass-data-") as tmp:
        if args.data_dir:
            data_dir = args.data_dir
        else:
            raw = demo_mapping(Path(tmp) / "demo", images_per_class=args.images_per_class, image_size=image_size,
                               cnn=cnn, vit=vit)
            data_dir = prepare_demo(raw, Path(tmp))
        df, info = read_manifest(data_dir)
        paths = df[df["split"] == "train"]["path"].tolist()
        root = Path(info.root)
        aug = AugmentConfig()
        step = step_params(cnn, vit, image_size, batch, precision=args.precision, device=args.device)
        multicrop = MultiCropTransform(image_size, dino_local_size(step), 8, DinoConfig().global_crop_scale,
                                       DinoConfig().local_crop_scale, aug)
        datasets = {
            "raw_decode": ImageDataset(root, paths, v2.ToImage()),
            "cass_loader": ImageDataset(root, paths, cass_transform(image_size, aug)),
            "dino_loader": ImageDataset(root, paths, multicrop),
        }
        if args.skip_dino:
            datasets.pop("dino_loader")
        same_size = df[["width", "height"]].drop_duplicates().shape[0] == 1
        runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {str(w): [] for w in workers} for name in datasets}
        for _ in range(args.repeats):  # interleaved, so that a change in background load hits every setting
            for w in workers:
                for name, ds in datasets.items():
                    if name == "raw_decode" and not same_size:  # files differ in size: no stacking
                        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w,
                                            collate_fn=_decode_collate, persistent_workers=w > 0)
                        make: Callable[[int], DataLoader] = lambda _epoch, loader=loader: loader  # noqa: E731
                    else:
                        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
                        epochs = EpochLoader(ds, sampler, batch, w, drop_last=True, pin_memory=pin)
                        make = lambda epoch, epochs=epochs: epochs.for_epoch(epoch, epoch, rank=0)  # noqa: E731
                    runs[name][str(w)].append(measure(make, args.min_images))
                    log.info("%s, %d worker(s): %.0f images/s", name, w, runs[name][str(w)][-1]["images_per_second"])
        loaders = {
            name: {w: {k: median([r[k] for r in rs]) for k in rs[0]} for w, rs in by_w.items()}
            for name, by_w in runs.items()
        }

    torch.manual_seed(0)
    times = interleaved_times({"cass": cass_step_fn(step)}, device, 5, args.steps)
    model_rate = batch / median(times["cass"])
    default = loaders["cass_loader"][str(default_workers)]["images_per_second"]
    per_worker = {
        name: {w: r["images_per_second"] / max(int(w), 1) for w, r in by_w.items()} for name, by_w in loaders.items()
    }
    emit({
        "benchmark": "data_pipeline",
        "settings": {
            "images": len(paths), "image_size": image_size, "batch_size": batch, "cnn": cnn, "vit": vit,
            "files": str(args.data_dir) if args.data_dir else f"demo dataset, {image_size} px PNG",
            "precision": precision.name, "default_workers": f"{args.default_workers} = {default_workers}",
            "min_images": args.min_images, "repeats": args.repeats, "raw_decode_batches_stacked": same_size,
        },
        "loaders": loaders,
        "images_per_second_per_worker": per_worker,
        "raw_decode_over_cass_loader": {
            w: loaders["raw_decode"][w]["images_per_second"] / loaders["cass_loader"][w]["images_per_second"]
            for w in loaders["cass_loader"]
        },
        "model_images_per_second": model_rate,
        "loader_over_model_at_default_workers": default / model_rate,
        "target": f"loader_over_model_at_default_workers >= {TARGET}",
        "target_met": default / model_rate >= TARGET,
        **env,
    })


if __name__ == "__main__":
    main()
