"""The bucket granularity of ``rewrite(bucket="auto")``: the choice and the timer."""

from __future__ import annotations

import json

from passes.rewrite.buckets import TOLERANCE, BucketTimer, choose_granularity, round_up


def test_round_up_caps_and_keeps_zero():
    assert [round_up(n, 4, 16) for n in (0, 1, 4, 5, 15, 16)] == [0, 4, 4, 8, 16, 16]
    assert round_up(30, 8, 24) == 24


class CountingTimer(BucketTimer):
    """A timer whose "seconds" are a fixed cost per call plus the padded width of each head,
    so the best granularity is known in advance."""

    def __init__(self, per_call: float, cache=None):
        super().__init__((1, 1), cache=cache)
        self.per_call = per_call
        self.measured = 0

    def _measure(self, hidden: int, heads: int, q_width: int, v_width: int) -> float:
        self.measured += 1
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
    assert choose_granularity(64, 8, buckets_at, CountingTimer(per_call=0.0)) == 1
    assert choose_granularity(64, 8, buckets_at, CountingTimer(per_call=1000.0)) == 8


def test_ties_go_to_the_larger_granularity():
    # heads of 4 and 8 dims: granularities 1, 2 and 4 make the same two calls; 8 pads to one
    buckets_at = heads_of_sizes([4, 8])
    assert choose_granularity(64, 8, buckets_at, CountingTimer(per_call=0.0)) == 4
    within = CountingTimer(per_call=0.0)
    assert within.seconds(64, buckets_at(8)) > within.seconds(64, buckets_at(4)) * (1 + TOLERANCE)


def test_each_bucket_size_is_measured_once():
    timer = CountingTimer(per_call=1.0)
    choose_granularity(64, 8, heads_of_sizes([1, 2, 5, 8]), timer)
    first = timer.measured
    choose_granularity(64, 8, heads_of_sizes([1, 2, 5, 8]), timer)
    assert timer.measured == first > 0


def test_the_real_timer_measures_positive_seconds():
    timer = BucketTimer((2, 8), reps=2)
    assert timer(16, 2, 4, 4) > 0
    assert timer.seconds(16, {(0, 4, 4): [0, 1], (0, 8, 8): [2]}) > 0


def test_measurements_are_kept_for_later_rewrites_on_this_machine(tmp_path):
    cache = tmp_path / "cache" / "bucket_seconds.json"
    first = CountingTimer(per_call=1.0, cache=cache)
    chosen = choose_granularity(64, 8, heads_of_sizes([1, 2, 5, 8]), first)
    first.save()
    (machine,) = json.loads(cache.read_text())
    assert "threads" in machine and "1x1" in machine
    again = CountingTimer(per_call=1000.0, cache=cache)  # would choose otherwise if it timed
    assert choose_granularity(64, 8, heads_of_sizes([1, 2, 5, 8]), again) == chosen
    assert again.measured == 0


def test_an_unreadable_cache_is_measured_over_and_replaced(tmp_path):
    cache = tmp_path / "bucket_seconds.json"
    cache.write_text("{not json")
    timer = CountingTimer(per_call=1.0, cache=cache)
    assert timer(64, 1, 4, 4) == 9.0 and timer.measured == 1
    timer.save()
    assert list(json.loads(cache.read_text()).values()) == [{"64,1,4,4": 9.0}]
