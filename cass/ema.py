"""Exponential moving averages of a network's weights: DINO's teacher (Caron et al. 2021) and BYOL's target
(Grill et al. 2020) follow their online network with :func:`ema_update`."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    t, s = list(target.parameters()), [p.detach() for p in online.parameters()]
    if len(t) != len(s):
        raise ValueError(f"target has {len(t)} parameters, online network {len(s)}; they must share an architecture")
    torch._foreach_lerp_(t, s, 1.0 - momentum)
