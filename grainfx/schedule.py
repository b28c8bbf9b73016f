"""Density and learning-rate schedules of GRAIN."""

from __future__ import annotations


def density_at(progress: float, target: float, start: float, end: float) -> float:
    """Density at ``progress`` (share of training done): 1 until ``start``, cubic down to
    ``target`` at ``end``, ``target`` after."""
    if progress <= start:
        return 1.0
    if progress >= end or end <= start:
        return target
    remaining = 1.0 - (progress - start) / (end - start)
    return target + (1.0 - target) * remaining**3


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of ``total`` steps, then linear decay to zero."""
    warm = int(total * warmup)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))
