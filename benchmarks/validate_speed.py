"""How fast does the manifest gate validate a dataset the size of ISIC 2019?

Generates 25,000 small JPEGs (128x96, ISIC 2019's 4:3 aspect scaled down; quality 90; 8 classes in ISIC
2019's proportions, so the imbalance warning fires as it would there) into a temporary folder, builds the
manifest with ``cass data prepare``, then times the manifest gate twice: cold (empty decode cache: every file
read, hashed and fully decoded) and warm (unchanged files: read and hashed, decode results from the cache).
Prints one JSON line with images/s, a one-core baseline (read + hash + full decode, serial) and versions.

"Cold" is about the decode cache, not the OS page cache: the files were just written, so they are read from
memory, as on a machine that has the dataset cached. Great Expectations is imported before timing (once per
process, reported as ``gx_import_s``). Timings on a shared machine vary from run to run: the line also gives
the load average and the CPU seconds used (this process and its decode workers), which other processes
affect much less than wall time.

    .venv/bin/python benchmarks/validate_speed.py [--images 25000] [--workers 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# ISIC 2019 training classes and their counts (25,331 images).
ISIC_2019 = {"NV": 12875, "MEL": 4522, "BCC": 3323, "BKL": 2624, "AK": 867, "SCC": 628, "VASC": 253, "DF": 239}
WIDTH, HEIGHT, QUALITY = 128, 96, 90


def _lesion(seed: int) -> bytes:
    """A dermoscopy-like picture: skin-toned background, a darker irregular lesion, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    skin = np.array([0.85, 0.65, 0.55]) + rng.normal(0, 0.04, 3)
    lesion = np.array([0.45, 0.28, 0.22]) + rng.normal(0, 0.05, 3)
    cy, cx = rng.uniform(0.3, 0.7) * HEIGHT, rng.uniform(0.3, 0.7) * WIDTH
    angle = np.arctan2(yy - cy, xx - cx)
    radius = rng.uniform(15, 35) * (1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6.3)))
    inside = np.clip((radius - np.hypot(yy - cy, xx - cx)) / 4.0, 0.0, 1.0)[..., None]
    img = skin * (1 - inside) + lesion * inside + rng.normal(0, 0.03, (HEIGHT, WIDTH, 3))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def _write(job: tuple[str, int]) -> int:
    path, seed = job
    data = _lesion(seed)
    Path(path).write_bytes(data)
    return len(data)


def generate(root: Path, n: int, workers: int) -> tuple[int, float]:
    """Write about ``n`` JPEGs as ``root/<class>/<id>.jpg``; returns their number and mean size in KB."""
    total = sum(ISIC_2019.values())
    jobs: list[tuple[str, int]] = []
    for c, count in ISIC_2019.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        k = max(1, round(n * count / total))
        jobs += [(str(root / c / f"ISIC_{len(jobs) + i:07d}.jpg"), len(jobs) + i) for i in range(k)]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        sizes = list(pool.map(_write, jobs, chunksize=256))
    return len(sizes), sum(sizes) / len(sizes) / 1024


def one_core_baseline(root: Path, sample: int = 3000) -> float:
    """Images/s of read + sha256 + full decode in one process: the floor a gate cannot beat per core."""
    paths = sorted(root.rglob("*.jpg"))[:sample]
    start = time.perf_counter()
    for p in paths:
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        Image.open(io.BytesIO(data)).load()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=25_000)
    ap.add_argument("--workers", type=int, default=0, help="decode processes; 0 = one per core")
    ap.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it (default: a temporary folder)")
    args = ap.parse_args()

    from cass.config import params_from_mapping
    from cass.data.prepare import prepare_data
    from cass.quality import validate_manifest
    from cass.quality.gate import import_gx

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cass-validate-bench-"))
    try:
        root = work / "images"
        t = time.perf_counter()
        n, mean_kb = generate(root, args.images, args.workers)
        generate_s = time.perf_counter() - t
        params = params_from_mapping(
            {"data": {"name": "bench", "root": str(root), "layout": "imagefolder", "workers": args.workers}}
        )
        t = time.perf_counter()
        prepare_data(params, work / "outputs" / "data")
        prepare_s = time.perf_counter() - t
        baseline = one_core_baseline(root)

        t = time.perf_counter()
        gx = import_gx()
        gx_import_s = time.perf_counter() - t
        cache = work / "outputs" / "quality" / "decode-cache.json"
        load_before = os.getloadavg()[0]
        timings, cpu = [], []
        for _ in ("cold", "warm"):
            c, t = _cpu_seconds(), time.perf_counter()
            result = validate_manifest(
                params, work / "outputs" / "data", work / "outputs" / "quality" / "manifest",
                cache_path=cache, raise_on_failure=False,
            )
            timings.append(time.perf_counter() - t)
            cpu.append(_cpu_seconds() - c)
        import pandas as pd
        import PIL

        print(
            json.dumps(
                {
                    "images": n,
                    "image": f"{WIDTH}x{HEIGHT} JPEG q{QUALITY}",
                    "mean_file_kb": round(mean_kb, 2),
                    "workers": args.workers or os.cpu_count(),
                    "cpu_count": os.cpu_count(),
                    "cold_s": round(timings[0], 3),
                    "cold_images_per_s": round(n / timings[0]),
                    "warm_s": round(timings[1], 3),
                    "warm_images_per_s": round(n / timings[1]),
                    "cold_cpu_s": round(cpu[0], 3),
                    "warm_cpu_s": round(cpu[1], 3),
                    "cold_images_per_cpu_s": round(n / cpu[0]),
                    "one_core_read_hash_decode_images_per_s": round(baseline),
                    "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    "gx_import_s": round(gx_import_s, 3),
                    "generate_s": round(generate_s, 1),
                    "prepare_s": round(prepare_s, 1),
                    "gate_success": result.success,
                    "gate_warnings": [w.check for w in result.warnings],
                    "python": sys.version.split()[0],
                    "pillow": PIL.__version__,
                    "great_expectations": gx.__version__,
                    "pandas": pd.__version__,
                    "numpy": np.__version__,
                    "platform": platform.platform(),
                    "cpu": _cpu_model(),
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
