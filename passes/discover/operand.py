"""Trace one attention operand (query, key or value) back to its projection.

Between a projection and the attention op a model may put: head splits and fused-projection
splits (layout ops), a scale, a norm over the head dims, rotary position embeddings and a
repeat of key/value heads for grouped-query attention. Each of these has its own recognizer;
the layout ops on the way are replayed on feature indices to find which weight rows feed each
(head, dim), so fused and interleaved projections need no special case.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from passes.discover.common import scalar
from passes.discover.head_norm import match_head_norm
from passes.discover.kv_repeat import match_kv_repeat
from passes.discover.rope import match_rope
from passes.errors import DiscoverError, UnsupportedArchitectureError
from passes.graph import (
    CAST_OPS,
    Projection,
    arg_node,
    aten,
    feature_rows,
    is_layout,
    is_op,
    match_projection,
    module_label,
    shape,
)
from passes.structure import HeadNorm, Rope


@dataclass(frozen=True)
class Operand:
    """What lies between one attention operand and its projection."""

    projection: Projection
    heads: int
    scale: float = 1.0
    rope: Rope | None = None
    norm: HeadNorm | None = None


def scaling(node: fx.Node) -> float | None:
    """The constant factor of ``x * c`` or ``x / c``, else None."""
    if is_op(node, [aten.mul.Tensor, aten.mul.Scalar]):
        return scalar(node.args[1])
    if is_op(node, [aten.div.Tensor, aten.div.Scalar]):
        divisor = scalar(node.args[1])
        return None if divisor is None else 1.0 / divisor
    return None


def trace_operand(node: fx.Node, role: str, heads: int, head_dim: int) -> Operand:
    """Follow attention operand ``node`` of ``heads`` x ``head_dim`` back to its projection.

    Raises DiscoverError (naming the node) on anything no recognizer accepts.
    """
    cur, chain, scale = node, [], 1.0
    rope = norm = None
    kv = heads
    while True:
        projection = match_projection(cur)
        if projection is not None:
            break
        if is_op(cur, CAST_OPS) or is_op(cur, [aten.dropout.default]):
            cur = arg_node(cur, 0)
            continue
        repeat = match_kv_repeat(cur) if role != "query" and kv == heads else None
        if repeat is not None:
            cur, kv = repeat
            if heads % kv:
                raise UnsupportedArchitectureError(
                    f"the {role} heads at {module_label(cur)} are repeated from {kv} to "
                    f"{heads}, which is not a whole number of query heads per key/value head"
                )
            continue
        found_rope = match_rope(cur) if rope is None and role != "value" else None
        if found_rope is not None:
            rope, cur = found_rope
            continue
        if is_layout(cur):
            chain.append(cur)
            cur = arg_node(cur, 0)
            continue
        factor = scaling(cur)
        if factor is not None:
            scale *= factor
            cur = arg_node(cur, 0)
            continue
        found_norm = match_head_norm(cur) if norm is None and role != "value" else None
        if found_norm is not None:
            dims = shape(cur)
            if dims is None or dims[-1] != head_dim:
                raise UnsupportedArchitectureError(
                    f"the {role} of attention at {module_label(cur)} is normed over the whole "
                    f"projection ({dims[-1] if dims else '?'} features, OLMo 2 "
                    f"style), not per head: removing any query/key dim or head would change "
                    f"the norm of the others; grainfx prunes norms over the head dims only"
                )
            norm, cur = found_norm
            continue
        raise DiscoverError(
            f"cannot trace the {role} of attention through {module_label(cur)} ({cur.target}) "
            f"back to a projection; recognized between projection and attention are head "
            f"splits, fused QKV splits, casts, a constant scale, a norm over the head dims, "
            f"rotary embeddings (rotate-half, interleaved, partial) and key/value head repeats"
        )
    rows = feature_rows(cur, chain[::-1])
    if rows is not None and role != "query" and kv == heads:
        rows, kv = _repeated_heads(rows, heads, head_dim)
    if rows is None or len(rows) != kv * head_dim or len(set(rows)) != len(rows):
        raise DiscoverError(
            f"the {role} of attention is not a head split of projection {module_label(cur)}: "
            f"expected {kv} heads x {head_dim} of its {projection.out_features} outputs"
        )
    if role == "value" and scale != 1.0:
        raise DiscoverError(
            f"the values of attention from {module_label(cur)} are scaled; "
            f"only query/key scaling is supported"
        )
    return Operand(projection.with_rows(projection.node, rows), kv, scale, rope, norm)


def _repeated_heads(rows: list[int], heads: int, head_dim: int) -> tuple[list[int], int]:
    """Key/value heads repeated by the layout ops themselves (Falcon's ``broadcast_to`` of
    (batch, seq, kv, 1, d) to g query heads per group): the rows of the distinct heads and
    their count; ``rows`` and ``heads`` unchanged where no head repeats."""
    per_head = [tuple(rows[h * head_dim : (h + 1) * head_dim]) for h in range(heads)]
    distinct = list(dict.fromkeys(per_head))
    if len(per_head) * head_dim != len(rows) or len(distinct) == heads or heads % len(distinct):
        return rows, heads
    group = heads // len(distinct)
    if per_head != [distinct[h // group] for h in range(heads)]:
        return rows, heads
    return [r for head in distinct for r in head], len(distinct)
