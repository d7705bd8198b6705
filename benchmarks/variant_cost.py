"""What a CASS variant costs per image against the paper's recipe, side by side in one run, at the same views.

A pretraining image costs its loading (decoding done once, then the augmented views: one per view, in the
training process as ``num_workers: auto`` does on a CPU) and its share of the training step
(``Engine.train_batch`` with the CASS learner: forward, loss, backward, optimiser step). For each recipe both
are timed here, round-robin with the other recipes so that a change of the machine's load hits all alike:

- ``paper``: ``pretrain.variant: paper`` (one view through both networks, ``2 - 2 cos``);
- ``simsiam+vicreg``: ``pretrain.variant: simsiam`` with ``pretrain.anti_collapse: vicreg`` (projectors,
  predictors with stop-gradient, VICReg's variance-covariance term on each network's embeddings);

each at 1 view and at 2 views (``pretrain.cass.views``; the paper's default is 1, simsiam's 2; with 2 views
the CNN sees the first and the ViT the second, so each network still runs one forward pass per image).
``ratio_per_image`` is the variant's cost per image over the paper's, at the same views and at each recipe's
default views.

    .venv/bin/python benchmarks/variant_cost.py [--threads 1] [--steps 15] [--images 64]
    .venv/bin/python benchmarks/variant_cost.py --cnn test_resnet --vit test_vit --image-size 32 --batch-size 32 \
        --embed-dim 128        # the networks and settings of the F1 benchmarks
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import add_speed_arguments, emit, interleaved_times, median, speed_setup

from cass.config import params_from_mapping

RECIPES = {"paper": {"variant": "paper"}, "simsiam+vicreg": {"variant": "simsiam", "anti_collapse": "vicreg"}}
DEFAULT_VIEWS = {"paper": 1, "simsiam+vicreg": 2}
TARGET = 1.5


def _params(cnn: str, vit: str, image_size: int, batch: int, recipe: dict, views: int, threads_note: str,
            embed_dim: int | None):
    return params_from_mapping({
        "model": {"cnn": cnn, "vit": vit, "image_size": image_size, **({"embed_dim": embed_dim} if embed_dim else {})},
        "pretrain": {"batch_size": batch, "precision": "fp32", "device": "cpu", **recipe, "cass": {"views": views}},
    }, f"variant_cost settings ({threads_note})")


class Recipe:
    """One recipe at one number of views: its loading per image and its training step, ready to time."""

    def __init__(self, params, images: list) -> None:
        from cass.cass_pretraining import CassLearner
        from cass.engine import Engine, EpochMeter, Step

        m, cfg = params.model, params.pretrain
        self.engine = Engine(cfg, seed=0, key="pretrain")
        self.learner = CassLearner(params, self.engine)
        self.learner.start_epoch(0)
        self.images, self.batch_size = images, cfg.batch_size
        views = self.learner.pair.views
        x = [torch.randn(cfg.batch_size, 3, m.image_size, m.image_size) for _ in range(views)]
        self.batch = (x if views == 2 else x[0], torch.full((cfg.batch_size,), -1))
        self.meter, self.step_ = EpochMeter(self.engine.device), Step(lr=cfg.lr)

    def load(self) -> None:
        """One batch of images through the recipe's pretraining transform (all its views)."""
        for image in self.images[:self.batch_size]:
            self.learner.transform(copy.copy(image))

    def step(self) -> None:
        self.engine.train_batch(self.learner, self.batch, self.step_, self.meter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(ap)
    ap.add_argument("--source-size", type=int, help="pixels of the image files, resized by the views "
                    "(default: --image-size; real datasets' files are often larger than the network's input)")
    ap.add_argument("--embed-dim", type=int, help="embedding width (default: model.embed_dim's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15, help="measured rounds (default %(default)s)")
    ap.add_argument("--images", type=int, default=64, help="demo images decoded for the loading (default %(default)s)")
    args = ap.parse_args()
    run = speed_setup(args)
    from cass.data.demo import generate_demo
    from cass.data.images import load_rgb

    with tempfile.TemporaryDirectory(prefix="cass-variant-cost-") as tmp:
        generate_demo(Path(tmp), images_per_class=max(1, args.images // 4), size=args.source_size or run.image_size)
        start = time.perf_counter()
        images = [load_rgb(p) for p in sorted(Path(tmp).rglob("*.png"))]
        decode = (time.perf_counter() - start) / len(images)
    note = f"{torch.get_num_threads()} torch threads"
    recipes = {(name, views): Recipe(_params(run.cnn, run.vit, run.image_size, run.batch, recipe, views, note,
                                             args.embed_dim), images)
               for name, recipe in RECIPES.items() for views in (1, 2)}
    fns = {f"{name}/{views}/{part}": getattr(r, part)
           for (name, views), r in recipes.items() for part in ("load", "step")}
    times = interleaved_times(fns, run.device, args.warmup, args.steps)
    per_image = {}
    for (name, views), _ in recipes.items():
        load = median(times[f"{name}/{views}/load"]) / run.batch
        step = median(times[f"{name}/{views}/step"]) / run.batch
        per_image[f"{name}/{views}"] = {"decode_s": decode, "augment_s": load, "step_s": step,
                                        "total_s": decode + load + step}
    total = {key: value["total_s"] for key, value in per_image.items()}
    ratio = {f"{v} view(s)": total[f"simsiam+vicreg/{v}"] / total[f"paper/{v}"] for v in (1, 2)}
    ratio["each recipe's default views"] = (per_image[f"simsiam+vicreg/{DEFAULT_VIEWS['simsiam+vicreg']}"]["total_s"]
                                            / per_image[f"paper/{DEFAULT_VIEWS['paper']}"]["total_s"])
    step_ratio = {f"{v} view(s)": per_image[f"simsiam+vicreg/{v}"]["step_s"] / per_image[f"paper/{v}"]["step_s"]
                  for v in (1, 2)}
    emit({
        "benchmark": "variant_cost",
        "settings": {"cnn": run.cnn, "vit": run.vit, "image_size": run.image_size, "batch_size": run.batch,
                     "embed_dim": recipes["paper", 1].learner.params.model.embed_dim,
                     "source_size": args.source_size or run.image_size,
                     "precision": "fp32", "warmup_rounds": args.warmup, "measured_rounds": args.steps},
        "seconds_per_image": per_image,
        "ratio_per_image": ratio,
        "ratio_step_only": step_ratio,
        "target": f"ratio_per_image at the same views <= {TARGET}",
        "target_met": all(ratio[f"{v} view(s)"] <= TARGET for v in (1, 2)),
        **run.env,
    })


if __name__ == "__main__":
    main()
