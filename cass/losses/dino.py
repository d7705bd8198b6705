"""The DINO objective (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over every pair of views.

    The teacher sees the two global crops, the student every crop; a crop is never compared with itself.
    After each call the centre moves towards the batch mean of the teacher outputs (momentum
    ``center_momentum``); the batch mean is summed over processes only when a process group exists,
    so the loss runs the same on one device without ``torch.distributed``.

    >>> loss = DINOLoss(out_dim=8, num_crops=4)
    >>> student, teacher = torch.randn(4 * 2, 8), torch.randn(2 * 2, 8)
    >>> float(loss(student, teacher, teacher_temp=0.04)) > 0
    True
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, num_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if num_crops < 2:
            raise ValueError(f"DINO needs at least the 2 global crops, got num_crops={num_crops}")
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``student_out``: (num_crops x B, out_dim), crops stacked in order (global ones first);
        ``teacher_out``: (2 x B, out_dim) for the two global crops."""
        student = (student_out.float() / self.student_temp).chunk(self.num_crops)
        teacher = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, terms = student_out.new_zeros((), dtype=torch.float32), 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_out)), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)
