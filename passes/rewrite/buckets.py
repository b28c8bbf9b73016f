"""How heads of unequal sizes share attention calls: the bucket granularity of one block.

Heads whose query and value sizes round up to the same multiple of the granularity ``g``
share one ``scaled_dot_product_attention`` call, zero-padded to that size. A small ``g``
pads little but makes more calls; a large one makes few calls of padded heads; and the
kernel's speed is far from linear in the head size (on this project's CPU one head of 16 + 16
dims ran faster than one of 8 + 8). ``rewrite(bucket="auto", cost=...)`` therefore prices each
candidate ``g`` by a cost model, the seconds of each bucket's work at its padded sizes, and
keeps the cheapest ``g``, the largest of those within :data:`TOLERANCE` of it (fewer shapes to
compile, and a choice that timing noise does not flip between near-equal options).

This module is pure: the cost model is an argument (:data:`BucketCost`). The measured one,
which times kernels on this machine and caches the seconds in a file, lives in grainfx
(``grainfx.buckets.BucketTimer``).
"""

from __future__ import annotations

from typing import Callable

__all__ = [
    "CANDIDATES",
    "TOLERANCE",
    "BucketCost",
    "bucket_seconds",
    "choose_granularity",
    "round_up",
]

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
TOLERANCE = 0.03

#: a bucket: (padded rotary pairs, padded other query dims, padded value dims) -> its heads
Buckets = dict[tuple[int, int, int], list[int]]
#: A cost model: seconds of one bucket's attention calls, given (model width, heads in the
#: bucket, padded query-and-key width per head, padded value width per head).
BucketCost = Callable[[int, int, int, int], float]


def round_up(n: int, step: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``step``, at most ``cap``; 0 stays 0."""
    if n == 0:
        return 0
    return min(cap, -(-n // step) * step)


def bucket_seconds(cost: BucketCost, hidden: int, buckets: Buckets) -> float:
    """Seconds of all the buckets of ``buckets`` in a model ``hidden`` wide, by ``cost``."""
    return sum(cost(hidden, len(h), 2 * wp + ws, wv) for (wp, ws, wv), h in buckets.items())


def choose_granularity(
    hidden: int, head_dim: int, buckets_at: Callable[[int], Buckets], cost: BucketCost
) -> int:
    """The granularity among :data:`CANDIDATES` below ``head_dim``, and ``head_dim`` itself,
    whose buckets, ``buckets_at(g)``, run fastest by ``cost``: the largest within
    :data:`TOLERANCE` of the fastest."""
    options = sorted({g for g in CANDIDATES if g < head_dim} | {head_dim})
    costs = {g: bucket_seconds(cost, hidden, buckets_at(g)) for g in options}
    best = min(costs.values())
    return max(g for g in options if costs[g] <= best * (1 + TOLERANCE))
