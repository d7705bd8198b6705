"""Shared pieces of the benchmark scripts: environment record, timing, settings and the experiment runner.

Benchmarks call the library (stage functions and the step functions the training loops use); they hold
no training logic of their own. Each script prints ONE JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cass.config import Params, params_from_mapping, with_values
from cass.study import methods as study_methods

log = logging.getLogger("benchmarks")

# CPU default: small real networks (not timm's test models, whose step time is all overhead).
CPU_PRESET = {"cnn": "resnet18", "vit": "vit_tiny_patch16_224", "image_size": 64, "batch_size": 16}
# GPU preset: the paper's networks at 224 px (the paper used 384 px for the ViT).
GPU_PRESET = {"cnn": "resnet50", "vit": "vit_base_patch16_224", "image_size": 224, "batch_size": 32}


@dataclass(frozen=True)
class SpeedSetup:
    """What a speed benchmark runs: the networks, image size and batch, and where."""

    cnn: str
    vit: str
    image_size: int
    batch: int
    device: torch.device
    precision: Any  # cass.training.Precision
    env: dict[str, Any]


def add_speed_arguments(ap: Any) -> None:
    """The options every speed benchmark shares: preset, networks, size, batch, precision, device, threads."""
    ap.add_argument("--gpu", action="store_true", help="GPU preset: resnet50 + vit_base_patch16_224, 224 px, batch 32")
    ap.add_argument("--cnn", help="timm CNN (default: the preset's)")
    ap.add_argument("--vit", help="timm ViT (default: the preset's)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    ap.add_argument("--device", default="auto")
    add_threads_argument(ap)


def speed_setup(args: Any) -> SpeedSetup:
    """Logging, threads, the preset with the command line's changes, the device and its precision."""
    from cass.training import resolve_device, resolve_precision

    setup_logging()
    apply_threads(args.threads)
    preset = GPU_PRESET if args.gpu else CPU_PRESET
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return SpeedSetup(
        cnn=args.cnn or preset["cnn"],
        vit=args.vit or preset["vit"],
        image_size=args.image_size or preset["image_size"],
        batch=args.batch_size or preset["batch_size"],
        device=device,
        precision=resolve_precision(args.precision, device),
        env=environment(device),
    )


def add_threads_argument(ap: Any) -> None:
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine"
    )


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("cass", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """Device and library versions, and the machine's load when the run started (shared machines)."""
    import numpy
    import PIL
    import timm
    import torchvision

    from cass.lineage import git_commit

    env = {
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        env["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    return env


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, measured: int
) -> dict[str, list[float]]:
    """Seconds per call of each step, measured round-robin (one call of each per round) so that a
    change in background load affects every contender alike. ``warmup`` rounds are discarded."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + measured):
        for name, fn in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
        if r == warmup - 1:
            log.info("warm-up done (%d rounds); measuring %d rounds", warmup, measured)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range, to show how noisy a timing was."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": float(q[1]), "p25": float(q[0]), "p75": float(q[2])}


# --------------------------------------------------------------------------------------------------
# Settings for the stage-level benchmarks (demo dataset, small models)


def demo_mapping(
    root: Path, *, images_per_class: int, image_size: int, cnn: str, vit: str, kind: str = "tissue"
) -> dict[str, Any]:
    """Settings over a generated dataset: ``kind`` tissue (the demo) or shapes (cass.data.shapes)."""
    return {
        "seed": 77,
        "data": {
            "name": "demo" if kind == "tissue" else f"demo-{kind}",
            "root": str(root),
            "layout": "imagefolder",
            "demo_images_per_class": images_per_class,
            "demo_image_size": image_size,
            "demo_kind": kind,
            "workers": 2,
        },
        "split": {"val": 0.1, "test": 0.2, "seed": 77, "label_fractions": [0.01, 0.1, 1.0]},
        "model": {"cnn": cnn, "vit": vit, "image_size": image_size, "embed_dim": 128},
        "pretrain": {"epochs": 10, "batch_size": 32, "num_workers": 0, "lr": 1e-3, "optimizer": "adam"},
        "finetune": {"epochs": 15, "batch_size": 16, "num_workers": 0, "lr": 1e-3, "patience": 5},
        "evaluate": {"batch_size": 128, "explain_per_class": 0},  # no heat-map panels: only metrics are compared
    }


def with_changes(raw: dict[str, Any], changes: dict[str, Any]) -> Params:
    """``raw`` with ``section.key`` changes applied, validated."""
    return with_values(params_from_mapping(raw, "benchmark settings"), changes, "benchmark settings")


# Each method is a set of settings (cass.study.methods: the CASS variants are pretrain.variant values of the one
# CASS stage); the F1 benchmarks run them through `cass study` (run_study_rows).
METHODS = study_methods.METHODS
DEFAULT_METHODS = ("CASS", "DINO", "CASS + anti-collapse", "no pretraining")
DATASETS = ("tissue", "shapes")


def parse_methods(text: str) -> list[str]:
    """A comma-separated list of METHODS names, or ``all``; an unknown name fails with the known ones."""
    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)} (or all)")
    return names


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set section.key=value`` options (values read as YAML), applied to every run after the method's."""
    from cass.config import parse_override

    return {".".join(parts): value for parts, value in (parse_override(item) for item in items)}


def run_study_rows(
    raw: dict[str, Any],
    work: Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    fractions: Sequence[float],
    networks: Sequence[str] = ("cnn", "vit"),
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``methods`` x ``seeds`` x ``fractions`` x ``networks`` on the generated dataset of ``raw`` through
    ``cass study`` (cass.study.runner, untracked) under ``work``: each method pretrains once per seed, each
    network is fine-tuned at each fraction and evaluated on the test split. ``extra`` changes the base settings
    (a method's own settings win). Returns one row per cell with the test macro F1; a rerun with the same
    ``work`` resumes (finished cells are kept)."""
    from cass.data.demo import generate_demo
    from cass.study.runner import run_study

    baseline = study_methods.NO_PRETRAINING if study_methods.NO_PRETRAINING in methods else methods[0]
    study = {"methods": list(methods), "seeds": list(seeds), "fractions": list(fractions),
             "networks": list(networks), "baseline": baseline, "recommendations": str(work / "recommendations")}
    params = with_changes(raw, {**(extra or {}), **{f"study.{k}": v for k, v in study.items()}})
    d = params.data
    generate_demo(Path(d.root), d.demo_images_per_class, d.demo_image_size, kind=d.demo_kind)

    def progress(cell: Any, result: dict[str, Any]) -> None:
        log.info("%s seed %d fraction %g %s: test macro F1 %.3f", cell.method, cell.seed, cell.fraction, cell.network,
                 result["macro_f1"])

    outcome = run_study(params, work, tracked=False, on_cell=progress)
    return [{"dataset": d.demo_kind, **{k: r[k] for k in ("method", "seed", "label_fraction", "network", "macro_f1",
                                                           "balanced_accuracy", "pretrain_seconds")},
             **(extra or {})} for r in outcome.plan.results()]


def prepare_demo(raw: dict[str, Any], work: Path) -> Path:
    """Generate the demo dataset and run the ``prepare`` stage on it; returns the prepared folder."""
    from cass.data.demo import generate_demo
    from cass.data.prepare import prepare_data

    params = params_from_mapping(raw)
    d = params.data
    generate_demo(Path(d.root), d.demo_images_per_class, d.demo_image_size, kind=d.demo_kind)
    return prepare_data(params, work / "data")


def markdown_table(summary: Sequence[dict[str, Any]], column: str, rows: Sequence[str]) -> str:
    """A markdown table of ``mean ± sd`` per combination of ``rows`` (one line each) across ``column``'s values."""
    columns = sorted({r[column] for r in summary})
    cells: dict[tuple, dict[Any, str]] = {}
    for r in summary:
        cells.setdefault(tuple(r[k] for k in rows), {})[r[column]] = f"{r['mean']:.3f} ± {r['sd']:.3f}"
    header = [*rows, *(f"{column} {c:g}" if isinstance(c, float) else f"{column} {c}" for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(cells, key=lambda k: tuple(str(x) for x in k)):
        lines.append("| " + " | ".join([*map(str, key), *(cells[key].get(c, "-") for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sd of test macro F1 over seeds, per combination of ``keys``."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r["macro_f1"])
    out = []
    for key, values in groups.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append({**dict(zip(keys, key, strict=True)), "mean": statistics.fmean(values), "sd": sd, "n": len(values)})
    return out


# --------------------------------------------------------------------------------------------------
# Training steps on synthetic batches (model cost only; the data pipeline is measured separately)


def step_params(cnn: str, vit: str, image_size: int, batch_size: int, *, embed_dim: int = 1000,
                precision: str = "auto", device: str = "auto", local_crops: int = 8, out_dim: int = 65536) -> Params:
    return params_from_mapping(
        {
            "model": {"cnn": cnn, "vit": vit, "image_size": image_size, "embed_dim": embed_dim},
            "pretrain": {
                "batch_size": batch_size,
                "precision": precision,
                "device": device,
                "dino": {"local_crops": local_crops, "out_dim": out_dim},
            },
        },
        "benchmark settings",
    )


def cass_step_fn(params: Params) -> Callable[[], None]:
    """One CASS optimiser step (both networks, one view) through the learner the pretrain stage trains:
    ``CassLearner.step`` (forward under the engine's autocast, loss, backward) and its optimiser step."""
    from cass.cass_pretraining import CassLearner
    from cass.engine import Engine, Step

    m, cfg = params.model, params.pretrain
    engine = Engine(cfg, seed=0, key="pretrain")
    learner = CassLearner(params, engine)
    learner.start_epoch(0)
    x = torch.randn(cfg.batch_size, 3, m.image_size, m.image_size, device=engine.device)
    batch, step = (x, torch.full((cfg.batch_size,), -1, device=engine.device)), Step(lr=cfg.lr)

    def run() -> None:
        learner.step(batch, step)
        learner.optimizer_step(step)

    return run


def single_network_step_fn(params: Params, network: str, device: torch.device, precision: Any) -> Callable[[], None]:
    """One network alone: forward, a loss on its embedding, backward, optimiser step (the ceiling's T)."""
    from cass.models import create_network
    from cass.training import autocast, make_optimizer, optimizer_step

    m, cfg = params.model, params.pretrain
    arch = m.cnn if network == "cnn" else m.vit
    net = create_network(arch, m.embed_dim, network, m.image_size).to(device).train()  # type: ignore[arg-type]
    channels_last = cfg.channels_last and device.type == "cuda" and network == "cnn"
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, [{"params": list(net.parameters())}])
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    x = torch.randn(cfg.batch_size, 3, m.image_size, m.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.nn.functional.normalize(torch.randn(cfg.batch_size, m.embed_dim, device=device), dim=-1)

    def step() -> None:
        with autocast(device, precision):
            z = net(x)
        loss = (2 - 2 * (torch.nn.functional.normalize(z.float(), dim=-1) * target).sum(-1)).mean()
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler)

    return step


def dino_local_size(params: Params) -> int:
    """The local crop size the DINO stage would use (it follows the ViT's patch grid)."""
    from cass.baselines.dino import local_crop_size
    from cass.models import create_network

    m = params.model
    with torch.device("meta"):  # only the patch size is needed: build without allocating weights
        vit = create_network(m.vit, 2, "vit", m.image_size)
    return local_crop_size(params.pretrain.dino, m.image_size, vit)


def dino_step_fn(params: Params, network: str, device: torch.device, precision: Any) -> Callable[[], None]:
    """One DINO optimiser step of one network (student on all crops, teacher on the global ones, EMA)."""
    from cass.baselines.dino import DinoLearner

    m, cfg = params.model, params.pretrain
    learner = DinoLearner.from_params(params, network, device, precision)  # type: ignore[arg-type]
    learner.train()
    local = dino_local_size(params)
    b = cfg.batch_size
    crops = [torch.randn(b, 3, m.image_size, m.image_size, device=device) for _ in range(2)] + [
        torch.randn(b, 3, local, local, device=device) for _ in range(cfg.dino.local_crops)
    ]

    def step() -> None:
        loss, _ = learner.forward_loss(crops, teacher_temp=cfg.dino.teacher_temp)
        learner.backward(loss)
        learner.optimizer_step(lr=5e-4 * b / 256, weight_decay=0.04, momentum=0.996, freeze_last_layer=False)

    return step
