"""The measured cost model of ``bucket="auto"``: the timer, its cache, and the rewrite with it."""

from __future__ import annotations

import json

import torch

import passes
from grainfx import buckets
from grainfx.buckets import BucketTimer
from passes.rewrite.buckets import choose_granularity
from tests.passes.rewrite.test_buckets import heads_of_sizes
from tests.passes.test_rewrite import draw_masks, masked, structure


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


def test_each_bucket_size_is_measured_once():
    timer = CountingTimer(per_call=1.0)
    choose_granularity(64, 8, heads_of_sizes([1, 2, 5, 8]), timer)
    first = timer.measured
    choose_granularity(64, 8, heads_of_sizes([1, 2, 5, 8]), timer)
    assert timer.measured == first > 0


def test_the_real_timer_measures_positive_seconds():
    timer = BucketTimer((2, 8), reps=2)
    assert timer(16, 2, 4, 4) > 0
    assert timer(16, 3, 8, 8) > 0


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


def test_the_measured_rewrite_gives_the_same_graph_run_after_run(tmp_path):
    arch = "bert-eager"
    struct, graph = structure(arch), masked(arch)
    passes.set_masks(graph, draw_masks(struct, "random", 3, 0.3))
    cache = tmp_path / "bucket_seconds.json"
    first = buckets.rewrite(graph, struct, shape=(4, 16), cache=cache)
    assert cache.exists() and first.grainfx_kept.bucket == "auto"
    second = buckets.rewrite(graph, struct, shape=(4, 16), cache=cache)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.code == second.code
