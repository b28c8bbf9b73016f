"""grainfx.schedule: the cubic density schedule and the learning-rate factor."""

from __future__ import annotations

import itertools

import pytest

from grainfx.schedule import density_at, lr_factor


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.2])
def test_density_is_one_until_prune_start(progress):
    assert density_at(progress, 0.05, 0.2, 0.4) == 1.0


@pytest.mark.parametrize("progress", [0.4, 0.41, 0.9, 1.0])
def test_density_is_target_after_prune_end(progress):
    assert density_at(progress, 0.05, 0.2, 0.4) == 0.05


def test_density_is_cubic_in_between():
    # halfway: s_f + (1 - s_f) * (1 - 0.5)^3
    assert density_at(0.3, 0.1, 0.2, 0.4) == pytest.approx(0.1 + 0.9 * 0.125)
    assert density_at(0.25, 0.2, 0.2, 0.4) == pytest.approx(0.2 + 0.8 * 0.75**3)
    assert density_at(0.2 + 1e-9, 0.1, 0.2, 0.4) == pytest.approx(1.0)
    assert density_at(0.4 - 1e-9, 0.1, 0.2, 0.4) == pytest.approx(0.1)


def test_density_decreases_monotonically():
    values = [density_at(i / 100, 0.03, 0.2, 0.4) for i in range(101)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert values[0] == 1.0 and values[-1] == 0.03


def test_density_with_empty_pruning_window():
    assert density_at(0.2, 0.1, 0.3, 0.3) == 1.0
    assert density_at(0.31, 0.1, 0.3, 0.3) == 0.1


def test_lr_warms_up_linearly():
    total, warmup = 100, 0.1
    assert lr_factor(0, total, warmup) == pytest.approx(0.1)
    assert lr_factor(4, total, warmup) == pytest.approx(0.5)
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    ups = [lr_factor(s, total, warmup) for s in range(10)]
    assert all(b > a for a, b in itertools.pairwise(ups))


def test_lr_decays_linearly_to_zero():
    total, warmup = 100, 0.1
    assert lr_factor(10, total, warmup) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)
    assert lr_factor(99, total, warmup) == pytest.approx(1 / 90)
    assert lr_factor(100, total, warmup) == 0.0
    assert lr_factor(150, total, warmup) == 0.0
    downs = [lr_factor(s, total, warmup) for s in range(10, 101)]
    assert all(b < a for a, b in itertools.pairwise(downs))


def test_lr_without_warmup_starts_at_full_rate():
    assert lr_factor(0, 10, 0.0) == 1.0
    assert lr_factor(5, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(0, 1, 0.1) == 1.0  # fewer steps than one warm-up step
