"""How close does `cass predict` come to the network's own batched speed?

Generates demo images, saves a classifier (random weights: speed does not depend on them) and, in one
process, on the same images, times:

- **raw**: the network's forward pass alone, in batches of ``--batch-size``, on tensors decoded and
  preprocessed beforehand (the ceiling: nothing but arithmetic), measured before and after each predict run
  and averaged, since a shared machine's load drifts;
- **predict**: :func:`cass.predict.predict_to_file`, what ``cass predict --output FILE`` runs once the model
  is loaded: reading, decoding in ``--workers`` DataLoader processes, batched forward, calibration,
  chunked CSV parts and the final merge. The model's loading is reported apart (``load_s``).

``ratio`` = predict images/s over raw images/s (target >= 0.8 on CPU), the median of ``--rounds`` rounds.
``cass predict`` scores several batches at once on the CPU (``--lanes``; default one per torch thread), so
the row also gives **raw_lanes**, the forward pass alone on the preprocessed tensors in the same lanes, and
``ratio_vs_raw_lanes``, predict over that: the cost of reading, decoding and writing with the arrangement of
the arithmetic held equal.
``cpu_ms_per_image`` gives the CPU time both spend per image (workers included), which other jobs on a
shared machine disturb much less than wall time.
``--before`` times instead the per-image path of the given revision (default: the last one before
batching), run from its own ``cass/serving.py``: every file read and decoded, then one image per forward
pass, as ``cass predict`` and the pyfunc model did there.

    .venv/bin/python benchmarks/predict_speed.py [--images 600] [--batch-size 64] [--workers N] [--rounds 3] [--before]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_threads_argument, apply_threads, emit, environment, setup_logging

from cass.data.demo import generate_demo

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REVISION = "ad53bb8"  # cass predict and the pyfunc model scored one image per forward pass
log = logging.getLogger("benchmarks")


def _classifier(folder: Path, arch: str, image_size: int) -> Path:
    from cass.classifier import ClassifierSpec
    from cass.training import save_weights

    torch.manual_seed(0)
    spec = ClassifierSpec("cnn", arch, image_size, ("adipose", "lymphocytes", "stroma", "tumor"), False,
                          (0.5,) * 3, (0.25,) * 3, temperature=0.8)
    folder.mkdir(parents=True)
    save_weights(spec.build(), folder / "model.safetensors")
    (folder / "model.json").write_text(spec.to_json())
    return folder


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the DataLoader workers, once they exit): less
    sensitive than wall time to other jobs on a shared machine."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


CPU_SECONDS: dict[str, list[float]] = {"raw": [], "predict": []}  # CPU seconds per image, per measurement


def _raw(model: torch.nn.Module, x: torch.Tensor, batch: int, rounds: int = 3, lanes: int | None = 1) -> float:
    """Images/s of the forward pass alone (median of ``rounds`` passes over all images, after a warm-up), one
    batch at a time on all torch threads (``lanes`` 1), or ``lanes`` batches at once as cass predict runs them
    (None: its default)."""
    from cass.inference import in_lanes, lanes_for

    def forward(i: int) -> torch.Tensor:
        with torch.inference_mode():
            return model(x[i:i + batch])

    starts = range(0, len(x), batch)
    arrangement = lanes_for(len(starts), lanes=lanes)
    forward(0)
    times = []
    for _ in range(rounds):
        start, cpu = time.perf_counter(), _cpu_s()
        for _ in in_lanes((partial(forward, i) for i in starts), *arrangement):
            pass
        times.append(time.perf_counter() - start)
        if lanes == 1:
            CPU_SECONDS["raw"].append((_cpu_s() - cpu) / len(x))
    return len(x) / statistics.median(times)


def _before(revision: str, folder: Path, paths: list[Path]) -> float:
    """Images/s of ``revision``'s per-image path, from its own cass/serving.py (after the model is loaded)."""
    import pandas as pd

    from cass.data.images import DEFAULT_MAX_PIXELS, decode_image, read_bytes

    source = subprocess.run(["git", "show", f"{revision}:cass/serving.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("cass_serving_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{revision}:cass/serving.py", "exec"), module.__dict__)
    classifier = module.ImageClassifier()
    classifier.load(folder)
    start = time.perf_counter()
    images = [read_bytes(p) for p in paths]  # as its predict_files did: read and check every file, then score
    for path, data in zip(paths, images, strict=True):
        decode_image(data, str(path), DEFAULT_MAX_PIXELS)
    classifier.predict(None, pd.DataFrame({"image": images}))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="demo images (a multiple of 4; default %(default)s)")
    ap.add_argument("--image-size", type=int, default=64, help="pixels (default %(default)s: the demo's)")
    ap.add_argument("--arch", default="test_resnet", help="timm network (default %(default)s: params.yaml's CNN)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, help="decoding processes of cass predict (default: its own choice, "
                    "from the first batch's timings)")
    ap.add_argument("--lanes", type=int, help="batches cass predict scores at once (default: its own choice, one "
                    "per torch thread; 1: one batch at a time, as before lanes)")
    ap.add_argument("--rounds", type=int, default=3, help="predict runs, each between two raw measurements; the "
                    "median ratio is reported (default %(default)s; 1 with --before)")
    ap.add_argument("--before", nargs="?", const=BEFORE_REVISION, metavar="REV",
                    help=f"time REV's per-image path instead (default REV: {BEFORE_REVISION})")
    add_threads_argument(ap)
    args = ap.parse_args()
    setup_logging()
    apply_threads(args.threads)

    from cass.data.images import load_rgb
    from cass.inference import lanes_for
    from cass.predict import load_for_inference, plan, predict_to_file

    env = environment(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="cass-predict-speed-") as tmp:
        generate_demo(Path(tmp) / "demo", images_per_class=args.images // 4, size=args.image_size)
        paths = sorted((Path(tmp) / "demo").rglob("*.png"))
        folder = _classifier(Path(tmp) / "model", args.arch, args.image_size)
        start = time.perf_counter()
        loaded = load_for_inference(str(folder))
        load_s = time.perf_counter() - start
        classifier = loaded[0]
        x = torch.stack([classifier.transform(load_rgb(p)) for p in paths])
        x = x.contiguous(memory_format=torch.channels_last)  # as cass predict feeds the network
        rounds = []  # (predict images/s, raw before, raw after): the load of a shared machine drifts
        raw_lanes = []  # the forward pass alone in cass predict's lanes, after each round
        raw = _raw(classifier.model, x, args.batch_size)
        for n in range(1 if args.before else args.rounds):
            if args.before:
                predict = _before(args.before, folder, paths)
            else:
                job = plan(str(folder), [str(p) for p in paths], Path(tmp) / f"predictions-{n}.csv",
                           batch_size=args.batch_size, workers=args.workers, lanes=args.lanes)
                start, cpu = time.perf_counter(), _cpu_s()
                summary = predict_to_file(job, loaded)
                predict = summary.predicted / (time.perf_counter() - start)
                CPU_SECONDS["predict"].append((_cpu_s() - cpu) / summary.predicted)
            after = _raw(classifier.model, x, args.batch_size)
            rounds.append((predict, raw, after))
            raw = after
            if not args.before:
                raw_lanes.append(_raw(classifier.model, x, args.batch_size, lanes=args.lanes))
    ratios = [p / ((b + a) / 2) for p, b, a in rounds]
    best = sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]  # the median round
    predict, before, after = rounds[best]
    emit({
        "benchmark": "predict_speed", "path": f"per-image ({args.before})" if args.before else "cass predict",
        "images": len(paths), "image_size": args.image_size, "arch": args.arch, "batch_size": args.batch_size,
        "workers": 0 if args.before else summary.workers,
        "workers_chosen": "auto" if args.workers is None and not args.before else "given", "load_s": round(load_s, 2),
        "predict_images_per_s": round(predict, 1), "raw_batched_images_per_s": round((before + after) / 2, 1),
        "ratio": round(ratios[best], 3), "ratios": [round(r, 3) for r in ratios],
        **({} if args.before else {
            "lanes": lanes_for(-(-len(paths) // args.batch_size), lanes=args.lanes)[0],
            "raw_lanes_images_per_s": round(raw_lanes[best], 1),
            "ratio_vs_raw_lanes": round(predict / raw_lanes[best], 3)}),
        "rounds": [[round(v, 1) for v in r] for r in rounds],
        "cpu_ms_per_image": {k: round(1000 * statistics.median(v), 2) for k, v in CPU_SECONDS.items() if v}, **env,
    })


if __name__ == "__main__":
    main()
