"""Batched classification: images decoded in DataLoader workers while the network scores the previous batch.

One implementation behind every way a model is used after training: ``cass predict`` (files on disk), the
pyfunc model (:mod:`cass.serving`, image bytes in a DataFrame) and ``mlflow models serve`` (the same pyfunc).
Each image is read and decoded by :func:`cass.data.images.decode_image` (the one decoder, whatever the file
format) and converted to 8-bit RGB; each batch is then resized and normalised at once, as evaluation's
transform does one image at a time (:class:`cass.data.transforms.EvalBatchTransform`, equal to it bit for
bit). A file that cannot be used does not stop the batch: it comes back in :attr:`Batch.failed` with the
reason, and the caller decides (the pyfunc model refuses the request, ``cass predict`` lists the file and
goes on).

Batched and one-image-at-a-time results are not bit-identical: a batched kernel sums in another order, so
logits differ in the last bits of float32, and the temperature (often < 1) scales that difference up.
tests/test_predict.py bounds it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cass.calibration import probabilities
from cass.data.images import DEFAULT_MAX_PIXELS, decode_image, read_bytes, to_rgb8
from cass.data.transforms import EvalBatchTransform
from cass.errors import DataError

DEFAULT_BATCH_SIZE = 64
MAX_LANES = 4  # batches scored at once on the CPU (cass.inference.lanes_for)
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Batch:
    """The scored images of one batch (positions in the input) and the inputs that could not be used."""

    indices: list[int]
    probs: np.ndarray  # (len(indices), n_classes), calibrated
    failed: list[tuple[int, str]]  # (position, what was wrong with it)
    workers: int = 0  # the decoding processes that read this batch (0: this process)


@dataclass(frozen=True)
class Classifier:
    """A fine-tuned network with its spec (classes, temperature, thresholds) and its evaluation preprocessing."""

    model: torch.nn.Module
    spec: Any  # cass.classifier.ClassifierSpec
    transform: Callable


def load_folder(folder: Path) -> Classifier:
    """A classifier folder (``model.json`` + ``model.safetensors``: a fine-tuning output, or the ``classifier``
    artifact of a logged model), on the CPU, channels-last. Reads weights and a spec only: no code from the
    folder runs, and MLflow is not imported."""
    from cass.classifier import load_classifier
    from cass.config import AugmentConfig

    model, spec = load_classifier(Path(folder), "cpu")
    # channels-last, as EvalBatchTransform's batches come: a CPU runs a CNN's convolutions about 1.2-1.6x faster
    # so (docs/benchmarks.md), a ViT's alike; the values are the same
    model.to(memory_format=torch.channels_last)
    return Classifier(model, spec, EvalBatchTransform(spec.image_size, AugmentConfig(mean=spec.mean, std=spec.std)))


class _Images(torch.utils.data.Dataset):
    """Image files or encoded bytes, decoded on access (in a DataLoader worker, or in this process).

    With an :class:`~cass.data.transforms.EvalBatchTransform` an image comes out as 8-bit pixels and the batch is
    resized and normalised at once by :class:`_Collate`; any other transform runs per image."""

    def __init__(self, sources: Sequence[bytes | str | Path], transform: Callable, max_pixels: int,
                 dicom: Any = None) -> None:
        self.sources, self.transform, self.max_pixels, self.dicom = sources, transform, max_pixels, dicom
        self.per_image = transform.image if isinstance(transform, EvalBatchTransform) else transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        source = self.sources[i]
        where = f"input row {i}" if isinstance(source, bytes) else str(source)
        try:
            data = source if isinstance(source, bytes) else read_bytes(Path(source), where)
            return i, self.per_image(to_rgb8(decode_image(data, where, self.max_pixels, self.dicom))), None
        except DataError as exc:
            return i, None, str(exc)


@dataclass(frozen=True)
class _Collate:
    """A batch's positions, its preprocessed tensor (None if no image was usable) and its failures."""

    transform: Callable

    def __call__(self, items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[
            list[int], torch.Tensor | None, list[tuple[int, str]]]:
        good = [(i, x) for i, x, _ in items if x is not None]
        failed = [(i, error) for i, x, error in items if x is None]
        if not good:
            return [], None, failed
        images = [x for _, x in good]
        x = self.transform.batch(images) if isinstance(self.transform, EvalBatchTransform) else torch.stack(images)
        return [i for i, _ in good], x, failed


def auto_workers(decode_s: float, forward_s: float, cores: int | None = None, threads: int | None = None) -> int:
    """Decoding processes worth starting, from one batch's measured decoding (``decode_s``, preprocessing
    included) and forward pass (``forward_s``) in this process, both in seconds per image.

    On a machine whose cores all run the forward pass (torch's threads >= cores) none: the lanes
    (:func:`lanes_for`) decode their own batches beside each other's forward passes, so a worker would only
    take a core from them. With cores to spare a worker pays once decoding is more than a tenth of the
    forward pass (below that, starting processes and passing batches between them cost more than they hide).
    """
    cores = cores or os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    spare = cores - threads
    if spare <= 0 or decode_s <= 0.1 * forward_s:
        return 0
    return max(1, min(4, spare, math.ceil(decode_s / max(forward_s, 1e-9))))


def lanes_for(batches: int, threads: int | None = None, lanes: int | None = None) -> tuple[int, int]:
    """How many of ``batches`` to score at once on the CPU, and torch threads for each: ``(lanes, threads per
    lane)``; ``lanes`` None: one per torch thread, at most :data:`MAX_LANES` (each holds a batch's activations).

    One forward pass spread over all cores spends part of each layer waiting for its slowest thread; the
    same cores running separate batches, a thread each, do not wait for each other, and each lane decodes its
    own images while the others compute, so the decoding hides in the time the barriers wasted (measured in
    docs/benchmarks.md: on 2 cores two lanes score faster than one two-thread pass on decoded tensors, and
    far faster beside other jobs, where a thread that loses its core stalls the others at every layer)."""
    threads = threads or torch.get_num_threads()
    lanes = max(1, min(lanes or min(threads, MAX_LANES), batches))
    return lanes, max(1, threads // lanes)


def in_lanes(jobs: Iterator[Callable[[], T]], lanes: int, threads: int) -> Iterator[T]:
    """Run ``jobs`` on ``lanes`` threads of ``threads`` torch threads each (inline for one lane), yielding
    their results in the jobs' order; at most two per lane wait at once."""
    if lanes == 1:
        yield from (job() for job in jobs)
        return
    restore = torch.get_num_threads()
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="cass-lane", initializer=torch.set_num_threads,
                              initargs=(threads,))
    pending: deque[Future] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) >= 2 * lanes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(restore)  # a lane's setting is also the default of threads started later


def classify(model: torch.nn.Module, spec: Any, transform: Callable, sources: Sequence[bytes | str | Path], *,
             batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = 0,
             max_pixels: int = DEFAULT_MAX_PIXELS, lanes: int | None = None) -> Iterator[Batch]:
    """Score ``sources`` (paths or encoded bytes) in batches of ``batch_size``, in input order.

    Batches are scored ``lanes`` at a time, each lane a thread that decodes its batch (unless workers do) and
    runs the forward pass on its share of torch's threads (None: :func:`lanes_for`). ``workers`` DataLoader
    processes read and decode instead while the network runs (0: the lanes decode, which suits a small
    request better than starting processes; None: with cores to spare beside torch's threads, the first batch
    is decoded and scored in this process and :func:`auto_workers` decides from its timings how many decode
    the rest, else 0). An error names the input by its path, or as "input row i" for bytes. ``spec`` is the
    classifier's :class:`~cass.classifier.ClassifierSpec`: its temperature and multi-label flag give the
    probabilities, and its DICOM pixel settings window DICOM inputs as the training data was windowed.
    """
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: give a number of images per forward pass >= 1")
    if workers is not None and workers < 0:
        raise DataError(f"workers {workers}: give a number of decoding processes >= 0")
    if lanes is not None and lanes < 1:
        raise DataError(f"lanes {lanes}: give a number of batches scored at once >= 1")
    images = _Images(sources, transform, max_pixels, spec.dicom_settings())
    collate = _Collate(transform)
    model.eval()

    def score(indices: list[int], x: torch.Tensor | None, failed: list[tuple[int, str]], used: int) -> Batch:
        if x is None:
            probs = np.zeros((0, len(spec.classes)))
        else:
            with torch.inference_mode():
                logits = model(x).float()
            probs = probabilities(logits.numpy(), spec.multilabel, spec.temperature)
        return Batch(indices, probs, failed, used)

    first = 0
    if workers is None and (os.cpu_count() or 1) <= torch.get_num_threads():
        workers = 0  # no core to spare for a worker (auto_workers): nothing to measure
    if workers is None:
        first = min(batch_size, len(sources))
        if first == 0:
            return
        start = time.perf_counter()
        indices, x, failed = collate([images[i] for i in range(first)])
        decoded = time.perf_counter()
        batch = score(indices, x, failed, 0)
        forward = time.perf_counter() - decoded
        # the rest needs more than one batch for processes to pay; an unusable first batch measures nothing
        workers = auto_workers((decoded - start) / max(1, len(indices)), forward / max(1, len(indices))) \
            if x is not None and len(sources) - first > batch_size else 0
        log.info("decoding %.2f ms, forward pass %.2f ms per image: %d decoding worker(s)",
                 1000 * (decoded - start) / max(1, len(indices)), 1000 * forward / max(1, len(indices)), workers)
        yield batch
        if first == len(sources):
            return

    def decode_and_score(lo: int) -> Batch:
        return score(*collate([images[i] for i in range(lo, min(lo + batch_size, len(sources)))]), 0)

    starts = range(first, len(sources), batch_size)
    lanes, threads = lanes_for(len(starts), lanes=lanes)
    if workers:  # the images after the first batch; _Images gives each its position in ``sources``
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(images, range(first, len(sources))), batch_size=batch_size, shuffle=False,
            num_workers=workers, collate_fn=collate, prefetch_factor=4, persistent_workers=False,
        )
        jobs = (partial(score, indices, x, failed, workers) for indices, x, failed in loader)
    else:
        jobs = (partial(decode_and_score, lo) for lo in starts)
    yield from in_lanes(jobs, lanes, threads)


def decided_labels(probs: np.ndarray, spec: Any) -> list[str]:
    """The predicted label of each row: the most probable class, or, for a multi-label model, the classes at
    or above their own thresholds joined with ``|`` (as ``cass evaluate`` decides)."""
    if not spec.multilabel:
        return [spec.classes[int(k)] for k in probs.argmax(axis=1)] if len(probs) else []
    cut = np.asarray(spec.thresholds if spec.thresholds is not None else spec.threshold)
    return ["|".join(c for c, hit in zip(spec.classes, row, strict=True) if hit) for row in probs >= cut]
