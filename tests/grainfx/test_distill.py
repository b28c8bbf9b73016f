"""grainfx.distill: soft cross-entropy on logits and the hidden-state maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grainfx.distill import HiddenMaps, kd_loss


def manual_soft_ce(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-position -sum_c p_t(c) log p_s(c), written out."""
    t = (teacher / temperature).double()
    s = (student / temperature).double()
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    return -(p_t * log_p_s).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_kd_loss_is_soft_cross_entropy(temperature):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    expected = manual_soft_ce(student, teacher, temperature).mean()
    got = kd_loss(student, teacher, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)  # no tau^2 factor
    if temperature == 1.0:
        soft = F.cross_entropy(student, torch.softmax(teacher, -1))
        assert got.item() == pytest.approx(soft.item(), rel=1e-5)


def test_kd_loss_gradient_reaches_student_only():
    student = torch.randn(4, 2, requires_grad=True)
    teacher = torch.randn(4, 2, requires_grad=True)
    kd_loss(student, teacher, 8.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kd_loss_is_minimal_at_teacher():
    teacher = torch.randn(6, 4)
    at_teacher = kd_loss(teacher, teacher, 8.0)
    for seed in range(5):
        other = teacher + 0.5 * torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
        assert kd_loss(other, teacher, 8.0) > at_teacher


def test_kd_loss_masks_padding_for_per_token_logits():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    per_token = manual_soft_ce(student, teacher, 2.0)
    expected = per_token[mask.bool()].mean()
    got = kd_loss(student, teacher, 2.0, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # padded positions do not count, whatever they hold
    student2, teacher2 = student.clone(), teacher.clone()
    student2[1, 3:] = 100 * torch.randn(2, 7, generator=gen)
    teacher2[1, 3:] = -100 * torch.randn(2, 7, generator=gen)
    assert kd_loss(student2, teacher2, 2.0, mask).item() == pytest.approx(got.item(), rel=1e-6)


def test_kd_loss_ignores_mask_for_pooled_logits():
    """Sequence classification: logits (batch, classes) and a (batch, seq) attention mask."""
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert kd_loss(student, teacher, 8.0, mask).item() == pytest.approx(
        manual_soft_ce(student, teacher, 8.0).mean().item(), rel=1e-5
    )


def test_kd_loss_in_half_precision_computes_in_float():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    got = kd_loss(student.bfloat16(), teacher.bfloat16(), 8.0)
    assert got.dtype == torch.float32
    expected = manual_soft_ce(student.bfloat16().float(), teacher.bfloat16().float(), 8.0)
    assert got.item() == pytest.approx(expected.mean().item(), rel=1e-5)


# -- hidden maps ---------------------------------------------------------------------------------


def test_hidden_maps_start_as_identity():
    maps = HiddenMaps(3, 8, 8)
    x = torch.randn(2, 5, 8)
    for m in maps.maps:
        assert torch.equal(m.weight, torch.eye(8))
        assert m.bias is None
        assert torch.allclose(m(x), x)
    states = [torch.randn(2, 5, 8) for _ in range(3)]
    assert maps(states, states).item() == 0.0


def test_hidden_maps_between_widths():
    maps = HiddenMaps(1, 4, 6)
    assert torch.equal(maps.maps[0].weight, torch.eye(6, 4))
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    mapped = torch.cat([student, torch.zeros(2, 3, 2)], dim=-1)
    expected = (mapped - teacher).pow(2).mean()
    assert maps([student], [teacher]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_loss_is_sum_of_layer_mse():
    maps = HiddenMaps(2, 8, 8)
    gen = torch.Generator().manual_seed(4)
    s = [torch.randn(2, 5, 8, generator=gen) for _ in range(2)]
    t = [torch.randn(2, 5, 8, generator=gen) for _ in range(2)]
    expected = sum(F.mse_loss(a, b) for a, b in zip(s, t, strict=True))
    assert maps(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_loss_ignores_padded_positions():
    maps = HiddenMaps(2, 8, 8)
    gen = torch.Generator().manual_seed(5)
    s = [torch.randn(2, 5, 8, generator=gen) for _ in range(2)]
    t = [torch.randn(2, 5, 8, generator=gen) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    keep = mask.bool()
    expected = sum(((a - b).pow(2).mean(-1))[keep].mean() for a, b in zip(s, t, strict=True))
    got = maps(s, t, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for x in s + t:
        x[1, 2:] = 1e3 * torch.randn(3, 8, generator=gen)
    assert maps(s, t, mask).item() == pytest.approx(got.item(), rel=1e-6)


def test_hidden_loss_trains_maps_and_student_not_teacher():
    maps = HiddenMaps(1, 4, 4)
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    maps([student], [teacher]).backward()
    assert student.grad is not None and maps.maps[0].weight.grad is not None
    assert teacher.grad is None


def test_logits_mask_is_the_decoders_in_an_encoder_decoder_batch():
    from grainfx.distill import logits_mask

    enc, dec = torch.ones(2, 5), torch.ones(2, 3)
    assert logits_mask({"input_ids": enc, "attention_mask": enc}) is enc
    assert logits_mask({"attention_mask": enc, "decoder_input_ids": dec}) is None
    assert (
        logits_mask(
            {"attention_mask": enc, "decoder_input_ids": dec, "decoder_attention_mask": dec}
        )
        is dec
    )
