"""The benchmarks' shared statistics: seed keys, paired bootstrap intervals and spreads."""

from __future__ import annotations

import torch

from benchmarks.common import paired_interval, seed_key, seed_keys, spread


def accuracy(rows: torch.Tensor) -> torch.Tensor:
    return rows.double().mean(-1)


def test_paired_interval_is_zero_for_identical_rows_and_excludes_zero_for_a_shift():
    a = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1])
    same = paired_interval(a, a.clone(), accuracy, resamples=50)
    assert same["difference"] == same["low"] == same["high"] == 0
    assert same["examples"] == 8 and same["resamples"] == 50
    better = paired_interval(torch.ones(40), torch.zeros(40), accuracy, resamples=50)
    assert better["low"] == better["difference"] == better["high"] == 1


def test_paired_interval_is_paired_not_two_independent_samples():
    # B is A with one example flipped: the paired difference moves only by the few times that
    # example is drawn, far less than either accuracy alone (95% width ~0.1 for 400 coin flips)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (400,), generator=gen)
    b = a.clone()
    b[0] = 1 - b[0]
    r = paired_interval(a, b, accuracy, resamples=200)
    assert r["high"] - r["low"] <= 5 / 400
    assert r["low"] <= r["difference"] <= r["high"]


def test_paired_interval_refuses_rows_of_different_examples():
    try:
        paired_interval(torch.ones(3), torch.ones(4), accuracy)
    except ValueError as e:
        assert "3 rows for A but 4 for B" in str(e)
    else:
        raise AssertionError("no error")


def test_seed_keys_find_every_seed_of_one_run_only():
    assert seed_key("grain-5", 0) == "grain-5" and seed_key("grain-5", 2) == "grain-5-s2"
    records = {"grain-5": {}, "grain-5-s1": {}, "grain-50": {}, "grain-5-kd": {}, "head-5-s1": {}}
    assert seed_keys("grain-5", records) == ["grain-5", "grain-5-s1"]


def test_spread_over_seeds():
    s = spread([0.7, 0.8, 0.9])
    assert abs(s["mean"] - 0.8) < 1e-12 and abs(s["std"] - 0.1) < 1e-12
    assert (s["min"], s["max"], s["n"]) == (0.7, 0.9, 3)
    assert spread([0.5])["std"] == 0.0
