"""The price of keeping a head, for latency-aware ranking (``GrainConfig(latency_aware=True)``).

A compact attention block pays two kinds of work: per unit (a query unit's rows of W_Q and
W_K, a value unit's W_V row and W_O column: proportional to the parameters) and, per query
head that keeps at least one query unit, the sequence x sequence work of its scores and
softmax, whatever the number of units left in it. Latency-aware ranking divides a query
unit's score by its cost, its own projection plus its share of the head's fixed cost, so a
head with few query units left loses them first and pruning ends with fewer, fuller heads.

Prices are measured on this machine at the shape the compact model will serve (median of
interleaved calls), in units of one query unit's projection, and recorded in the report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grainfx.timing import interleaved_medians
from passes.structure import Structure


def head_price(
    hidden: int, head_dim: int, unit_params: int, shape: tuple[int, int], reps: int = 15
) -> float:
    """Seconds of one head's scores, softmax and weighted sum (sdpa, ``head_dim`` wide) at
    ``shape`` = (batch, sequence), divided by the seconds of the projection work of one query
    unit of ``unit_params`` parameters (timed as a ``hidden`` x ``hidden`` matmul over the same
    tokens, scaled per parameter)."""
    batch, seq = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, seq, head_dim, generator=gen)
    x = torch.randn(batch * seq, hidden, generator=gen)
    w = torch.randn(hidden, hidden, generator=gen)
    times = interleaved_medians(
        {
            "head": lambda: F.scaled_dot_product_attention(q, q, q),
            "projection": lambda: x @ w,
        },
        reps,
    )
    per_param = times["projection"] / (hidden * hidden)
    return times["head"] / (unit_params * per_param)


def head_prices(structure: Structure, shape: tuple[int, int]) -> dict[str, float]:
    """``{query mask name: price}`` for every block with query units: the fixed cost of one
    key/value group (its query heads' sequence x sequence work) in query-unit projections.
    Blocks of the same dimensions share one measurement."""
    measured: dict[tuple[int, int, int], float] = {}
    prices = {}
    for block in structure.attention:
        names = block.mask_names()
        if "qk" not in names:
            continue
        key = (block.q.in_features, block.head_dim, block.query_unit_params)
        if key not in measured:
            measured[key] = head_price(*key, shape)
        prices[names["qk"]] = block.group_size * measured[key]
    return prices
