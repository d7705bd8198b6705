"""Batched classification: images decoded in DataLoader workers while the network scores the previous batch.

One implementation behind every way a model is used after training: ``cass predict`` (files on disk), the
pyfunc model (:mod:`cass.serving`, image bytes in a DataFrame) and ``mlflow models serve`` (the same pyfunc).
Each image is read and decoded by :func:`cass.data.images.decode_image` (the one decoder, whatever the file
format), converted to 8-bit RGB and preprocessed as evaluation does; a file that cannot be used does not stop
the batch: it comes back in :attr:`Batch.failed` with the reason, and the caller decides (the pyfunc model
refuses the request, ``cass predict`` lists the file and goes on).

Batched and one-image-at-a-time results are not bit-identical: a batched kernel sums in another order, so
logits differ in the last bits of float32, and the temperature (often < 1) scales that difference up.
tests/test_inference.py bounds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cass.calibration import probabilities
from cass.data.images import DEFAULT_MAX_PIXELS, decode_image, read_bytes, to_rgb8
from cass.errors import DataError

DEFAULT_BATCH_SIZE = 64



@dataclass(frozen=True)
class Batch:
    """The scored images of one batch (positions in the input) and the inputs that could not be used."""

    indices: list[int]
    probs: np.ndarray  # (len(indices), n_classes), calibrated
    failed: list[tuple[int, str]]  # (position, what was wrong with it)


@dataclass(frozen=True)
class Classifier:
    """A fine-tuned network with its spec (classes, temperature, thresholds) and its evaluation preprocessing."""

    model: torch.nn.Module
    spec: Any  # cass.classifier.ClassifierSpec
    transform: Callable


def load_folder(folder: Path) -> Classifier:
    """A classifier folder (``model.json`` + ``model.safetensors``: a fine-tuning output, or the ``classifier``
    artifact of a logged model), on the CPU. Reads weights and a spec only: no code from the folder runs, and
    MLflow is not imported."""
    from cass.classifier import load_classifier
    from cass.config import AugmentConfig
    from cass.data.transforms import eval_transform

    model, spec = load_classifier(Path(folder), "cpu")
    return Classifier(model, spec, eval_transform(spec.image_size, AugmentConfig(mean=spec.mean, std=spec.std)))


class _Images(torch.utils.data.Dataset):
    """Image files or encoded bytes, decoded and preprocessed on access (in a DataLoader worker)."""

    def __init__(self, sources: Sequence[bytes | str | Path], transform: Callable, max_pixels: int,
                 dicom: Any = None) -> None:
        self.sources, self.transform, self.max_pixels, self.dicom = sources, transform, max_pixels, dicom

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        source = self.sources[i]
        where = f"input row {i}" if isinstance(source, bytes) else str(source)
        try:
            data = source if isinstance(source, bytes) else read_bytes(Path(source), where)
            return i, self.transform(to_rgb8(decode_image(data, where, self.max_pixels, self.dicom))), None
        except DataError as exc:
            return i, None, str(exc)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None,
                                                                                  list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, error) for i, x, error in items if x is None]
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None), failed


def classify(model: torch.nn.Module, spec: Any, transform: Callable, sources: Sequence[bytes | str | Path], *,
             batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Batch]:
    """Score ``sources`` (paths or encoded bytes) in batches of ``batch_size``, in input order.

    ``workers`` DataLoader processes read and decode while the network runs (0: in this process, which
    suits a small request better than starting processes). An error names the input by its path, or as
    "input row i" for bytes. ``spec`` is the classifier's
    :class:`~cass.classifier.ClassifierSpec`: its temperature and multi-label flag give the probabilities, and
    its DICOM pixel settings window DICOM inputs as the training data was windowed.
    """
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: give a number of images per forward pass >= 1")
    if workers < 0:
        raise DataError(f"workers {workers}: give a number of decoding processes >= 0")
    loader = torch.utils.data.DataLoader(
        _Images(sources, transform, max_pixels, spec.dicom_settings()), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    model.eval()
    for indices, x, failed in loader:
        if x is None:
            probs = np.zeros((0, len(spec.classes)))
        else:
            with torch.inference_mode():
                logits = model(x).float()
            probs = probabilities(logits.numpy(), spec.multilabel, spec.temperature)
        yield Batch(indices, probs, failed)


def decided_labels(probs: np.ndarray, spec: Any) -> list[str]:
    """The predicted label of each row: the most probable class, or, for a multi-label model, the classes at
    or above their own thresholds joined with ``|`` (as ``cass evaluate`` decides)."""
    if not spec.multilabel:
        return [spec.classes[int(k)] for k in probs.argmax(axis=1)] if len(probs) else []
    cut = np.asarray(spec.thresholds if spec.thresholds is not None else spec.threshold)
    return ["|".join(c for c, hit in zip(spec.classes, row, strict=True) if hit) for row in probs >= cut]
