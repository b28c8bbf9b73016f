"""The distillation losses of GRAIN: soft cross-entropy on logits and the hidden-state MSE."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft cross-entropy between temperature-scaled distributions (no tau^2 factor).

    ``student`` and ``teacher`` are logits with classes last; for per-token logits
    (batch, seq, classes) pass the attention ``mask`` (batch, seq) to ignore padding.
    """
    target = torch.softmax(teacher.detach().float() / temperature, dim=-1)
    loss = -(target * torch.log_softmax(student.float() / temperature, dim=-1)).sum(-1)
    if mask is not None and loss.shape == mask.shape:
        weights = mask.to(loss.dtype)
        return (loss * weights).sum() / weights.sum().clamp_min(1)
    return loss.mean()


#: Batch entry, beside the model's inputs, marking the positions to distil (from labels).
KD_POSITIONS = "grainfx_kd_positions"


def logits_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The padding mask of the positions the logits are for: the decoder's in an
    encoder-decoder batch (none when it has no ``decoder_attention_mask``), else
    ``attention_mask``."""
    if "decoder_input_ids" in batch or "decoder_attention_mask" in batch:
        return batch.get("decoder_attention_mask")
    return batch.get("attention_mask")


class HiddenMaps(nn.Module):
    """Trainable linear maps from student to teacher layer outputs, initialised to identity."""

    def __init__(self, count: int, student_dim: int, teacher_dim: int):
        super().__init__()
        maps = [nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(count)]
        with torch.no_grad():
            for m in maps:
                m.weight.copy_(torch.eye(teacher_dim, student_dim))
        self.maps = nn.ModuleList(maps)

    def forward(
        self,
        student: list[torch.Tensor],
        teacher: list[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over layers of the MSE between mapped student and teacher states.

        Padding positions (``mask`` == 0, shape (batch, seq)) are left out.
        """
        total = student[0].new_zeros(())
        for m, hs, ht in zip(self.maps, student, teacher, strict=False):
            err = (m(hs) - ht.detach()).pow(2).mean(-1)
            if mask is not None and err.shape == mask.shape:
                weights = mask.to(err.dtype)
                total = total + (err * weights).sum() / weights.sum().clamp_min(1)
            else:
                total = total + err.mean()
        return total
