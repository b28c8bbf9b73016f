"""The bucket granularity of ``rewrite(bucket="auto")``: the choice by a cost model."""

from __future__ import annotations

from passes.rewrite.buckets import TOLERANCE, bucket_seconds, choose_granularity, round_up


def test_round_up_caps_and_keeps_zero():
    assert [round_up(n, 4, 16) for n in (0, 1, 4, 5, 15, 16)] == [0, 4, 4, 8, 16, 16]
    assert round_up(30, 8, 24) == 24


class CountingCost:
    """A cost model of a fixed cost per call plus the padded width of each head, so the best
    granularity is known in advance; it counts the sizes it is asked to price."""

    def __init__(self, per_call: float):
        self.per_call = per_call
        self.priced = 0

    def __call__(self, hidden: int, heads: int, q_width: int, v_width: int) -> float:
        self.priced += 1
        return self.per_call + heads * (q_width + v_width)


def heads_of_sizes(sizes: list[int]):
    def buckets_at(step: int):
        out: dict[tuple[int, int, int], list[int]] = {}
        for h, n in enumerate(sizes):
            w = round_up(n, step, 8)
            out.setdefault((0, w, w), []).append(h)
        return out

    return buckets_at


def test_cheap_calls_choose_tight_buckets_and_dear_calls_few_buckets():
    buckets_at = heads_of_sizes([1, 2, 5, 8])
    assert choose_granularity(64, 8, buckets_at, CountingCost(per_call=0.0)) == 1
    assert choose_granularity(64, 8, buckets_at, CountingCost(per_call=1000.0)) == 8


def test_ties_go_to_the_larger_granularity():
    # heads of 4 and 8 dims: granularities 1, 2 and 4 make the same two calls; 8 pads to one
    buckets_at = heads_of_sizes([4, 8])
    cost = CountingCost(per_call=0.0)
    assert choose_granularity(64, 8, buckets_at, cost) == 4
    assert bucket_seconds(cost, 64, buckets_at(8)) > bucket_seconds(cost, 64, buckets_at(4)) * (
        1 + TOLERANCE
    )
