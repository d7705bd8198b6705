"""The representation monitor: kNN accuracy of each network's features while it pretrains.

A loss near zero does not say whether pretraining learns anything (a collapsed pair reaches it too). The
monitor says it directly: it embeds the labelled subset of the training split and the validation split
with each network (eval mode, no gradient), fits a cosine k-nearest-neighbour classifier on the first
and scores it on the second. This is the weighted-kNN evaluation of self-supervised features used by
Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination") and DINO
(Caron et al. 2021), here with a plain majority vote, as scikit-learn's ``KNeighborsClassifier``. The test
split is never read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cass.config import Params
from cass.data.dataset import ImageDataset, encode_targets, make_loader
from cass.data.manifest import label_lists, read_manifest
from cass.data.splits import read_subset
from cass.data.transforms import eval_transform
from cass.errors import ConfigError, DataError
from cass.models import backbone_features

QUERY_CHUNK = 1024  # rows of the similarity matrix held at once


def knn_predict(train_z: torch.Tensor, train_y: torch.Tensor, query_z: torch.Tensor, k: int) -> torch.Tensor:
    """Majority vote of the ``k`` most cosine-similar training embeddings for each query (ties go to the
    smaller class index, as in scikit-learn); ``k`` is capped at the number of training embeddings."""
    if len(train_z) == 0:
        raise ValueError("kNN needs at least one training embedding")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(train_z))
    train = F.normalize(train_z.double(), dim=-1)
    labels = train_y.long()
    num_classes = int(labels.max()) + 1
    out = []
    for chunk in F.normalize(query_z.double(), dim=-1).split(QUERY_CHUNK):
        neighbours = (chunk @ train.T).topk(k, dim=-1).indices
        votes = F.one_hot(labels[neighbours], num_classes).sum(dim=1)
        out.append(votes.argmax(dim=-1))  # the first of equal maxima: the smallest class index
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    train_z: torch.Tensor, train_y: torch.Tensor, query_z: torch.Tensor, query_y: torch.Tensor, k: int
) -> float:
    """Share of the queries whose kNN vote (:func:`knn_predict`) is their label."""
    if len(query_z) != len(query_y) or len(train_z) != len(train_y):
        raise ValueError(
            f"embeddings and labels differ in length: train {len(train_z)} vs {len(train_y)}, "
            f"query {len(query_z)} vs {len(query_y)}"
        )
    if len(query_z) == 0:
        raise ValueError("kNN accuracy needs at least one query embedding")
    return float((knn_predict(train_z, train_y, query_z, k) == query_y.long()).double().mean())


@torch.no_grad()
def embed(network: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Pooled backbone features (float32, on the CPU) of every batch, in eval mode; the network's
    training mode is restored afterwards."""
    was_training = network.training
    network.eval()
    try:
        return torch.cat([backbone_features(network, x.to(device)).float().cpu() for x in batches])
    finally:
        network.train(was_training)


class KnnMonitor:
    """kNN accuracy of each network's features: fitted on ``fit``, scored on ``score`` (labelled datasets)."""

    def __init__(
        self, fit: ImageDataset, score: ImageDataset, k: int, batch_size: int = 64, num_workers: int = 0
    ) -> None:
        for name, ds in (("fit", fit), ("score", score)):
            if ds.targets is None or len(ds) == 0:
                raise DataError(f"kNN monitor: the {name} set needs labelled images, got {len(ds)} without labels")
        self.fit, self.score, self.k = fit, score, k
        self.batch_size, self.num_workers = batch_size, num_workers

    @classmethod
    def from_params(cls, params: Params, data_dir: Path, num_workers: int = 0) -> KnnMonitor:
        """The monitor of ``pretrain.monitor_*``: the subset file of ``pretrain.monitor_label_fraction``
        (default ``finetune.label_fraction``) against the validation split of the prepared manifest."""
        df, info = read_manifest(Path(data_dir))
        if info.multilabel:
            raise ConfigError("pretrain.monitor_every: the kNN monitor needs single-label data; set it to 0")
        fraction = params.pretrain.monitor_label_fraction or params.finetune.label_fraction
        subset = set(read_subset(Path(data_dir), fraction))
        fit_rows = df[(df["split"] == "train") & df["path"].isin(subset)]
        score_rows = df[df["split"] == "val"]
        if score_rows.empty:
            raise DataError(f"{data_dir}: no validation images for the kNN monitor; set split.val > 0")
        transform = eval_transform(params.model.image_size, params.augment)

        def dataset(rows: pd.DataFrame) -> ImageDataset:
            targets = encode_targets(label_lists(rows), info.classes, multilabel=False)
            return ImageDataset(Path(info.root), rows["path"].tolist(), transform, targets,
                                max_pixels=params.data.max_image_pixels)

        return cls(dataset(fit_rows), dataset(score_rows), params.pretrain.monitor_k, params.evaluate.batch_size,
                   num_workers)

    def _embed(self, network: nn.Module, dataset: ImageDataset, device: torch.device | str) -> torch.Tensor:
        loader = make_loader(dataset, self.batch_size, shuffle=False, num_workers=self.num_workers, seed=0)
        return embed(network, (x for x, _ in loader), device)

    def __call__(self, networks: Mapping[str, nn.Module], device: torch.device | str = "cpu") -> dict[str, float]:
        """``{"<name>_knn_accuracy": ...}`` for each of ``networks`` (plain modules, not DDP wrappers)."""
        fit_y = torch.as_tensor(np.asarray(self.fit.targets))
        score_y = torch.as_tensor(np.asarray(self.score.targets))
        return {
            f"{name}_knn_accuracy": knn_accuracy(
                self._embed(net, self.fit, device), fit_y, self._embed(net, self.score, device), score_y, self.k
            )
            for name, net in networks.items()
        }
