"""Focal loss (Lin et al., 2017) in softmax form (single-label) and sigmoid form (multi-label)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WeightScheme = Literal["inverse_frequency", "authors", "none"]


def class_weights(counts: Sequence[int], scheme: WeightScheme) -> torch.Tensor:
    """Per-class weights from per-class training counts.

    - ``inverse_frequency`` (default): ``N / (K * n_c)``, so rare classes weigh more and the weights
      average 1 over the samples.
    - ``authors``: the public CASS notebook's min-max scaled counts, ``(n_c - min) / (max - min)``:
      frequent classes weigh MORE and the rarest weighs 0. Kept only to reproduce that notebook.
    - ``none``: all ones.
    """
    n = np.asarray(counts, dtype=np.float64)
    if scheme == "none":
        w = np.ones_like(n)
    elif scheme == "inverse_frequency":
        if (n <= 0).any():
            raise ValueError(f"a class has no training example (counts {n.astype(int).tolist()})")
        w = n.sum() / (len(n) * n)
    elif scheme == "authors":
        spread = n.max() - n.min()
        w = np.ones_like(n) if spread == 0 else (n - n.min()) / spread
        log.warning("class_weights=authors: frequent classes weigh more and the rarest class weighs 0")
    else:
        raise ValueError(f"unknown class weight scheme {scheme!r}; choose inverse_frequency, authors or none")
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss; mean over samples (softmax form) or over sample-label pairs (sigmoid form).

    Softmax form, for targets ``y`` (class indices)::

        loss_i = -alpha * w[y_i] * (1 - p_i[y_i]) ** gamma * log p_i[y_i]

    Sigmoid form, for multi-hot targets ``y`` and ``p = sigmoid(logits)``::

        p_t = p * y + (1 - p) * (1 - y)
        loss_ic = -alpha * w[c] * (1 - p_t) ** gamma * log p_t

    >>> FocalLoss(gamma=0.0)(torch.zeros(2, 2), torch.tensor([0, 1])).item()  # = cross-entropy log 2
    0.6931...
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float = 1.0,
        weight: torch.Tensor | None = None,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.multilabel = multilabel
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multilabel:
            target = target.float()
            log_p = F.logsigmoid(logits)
            log_not_p = F.logsigmoid(-logits)
            log_pt = target * log_p + (1.0 - target) * log_not_p
            loss = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
            if self.weight is not None:
                loss = loss * self.weight.to(loss.device)
            return self.alpha * loss.mean()
        log_p = F.log_softmax(logits, dim=-1)
        log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
        loss = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
        if self.weight is not None:
            loss = loss * self.weight.to(loss.device)[target.long()]
        return self.alpha * loss.mean()
