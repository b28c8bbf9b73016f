"""Trace one attention operand (query, key or value) back to its projection.

Between a projection and the attention op a model may put: head splits and fused-projection
splits (layout ops), a scale, a norm over the head dims, rotary position embeddings and a
repeat of key/value heads for grouped-query attention. The last three belong to attention
features, each with its own recognizer (:mod:`passes.features`); the layout ops on the way
are replayed on feature indices to find which weight rows feed each (head, dim), so fused
and interleaved projections need no special case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import fx

from passes.discover.common import scaling
from passes.errors import DiscoverError
from passes.features import kv_repeat
from passes.features.registry import OPERAND_RECOGNIZERS
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
)


@dataclass(frozen=True)
class Operand:
    """What lies between one attention operand and its projection: ``heads`` distinct heads,
    the ``scale`` applied, and ``found``: what the operand recognizers found, by their key
    (``"rope"``, ``"norm"``, ``"kv_heads"``). ``transformed``: a scale or a recognizer that
    changes the values lies on the way (not only head repeats)."""

    projection: Projection
    heads: int
    scale: float = 1.0
    found: Mapping[str, Any] = field(default_factory=dict)
    transformed: bool = False


def trace_operand(node: fx.Node, role: str, heads: int, head_dim: int) -> Operand:
    """Follow attention operand ``node`` of ``heads`` x ``head_dim`` back to its projection.

    Between them: casts and dropout, layout ops, a constant scale, and what the operand
    recognizers of the attention features match (:data:`passes.features.registry.
    OPERAND_RECOGNIZERS`, each at most once). Raises DiscoverError (naming the node) on
    anything no recognizer accepts.
    """
    cur, chain, scale = node, [], 1.0
    found: dict[str, Any] = {}
    transformed = False
    while True:
        projection = match_projection(cur)
        if projection is not None:
            break
        if is_op(cur, CAST_OPS) or is_op(cur, [aten.dropout.default]):
            cur = arg_node(cur, 0)
            continue
        matched = _recognize(cur, role, heads, head_dim, found, early=True)
        if matched is not None:
            cur, transformed = matched[0], transformed or matched[1]
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
        matched = _recognize(cur, role, heads, head_dim, found, early=False)
        if matched is not None:
            cur, transformed = matched[0], transformed or matched[1]
            continue
        raise DiscoverError(
            f"cannot trace the {role} of attention through {module_label(cur)} ({cur.target}) "
            f"back to a projection; recognized between projection and attention are head "
            f"splits, fused QKV splits, casts, a constant scale, a norm over the head dims, "
            f"rotary embeddings (rotate-half, interleaved, partial) and key/value head repeats"
        )
    kv = found.get(kv_repeat.OPERAND.key, heads)
    rows = feature_rows(cur, chain[::-1])
    if rows is not None and role != "query" and kv == heads:
        rows, kv = kv_repeat.repeated_heads(rows, heads, head_dim)
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
    return Operand(
        projection.with_rows(projection.node, rows),
        kv,
        scale,
        found,
        transformed or scale != 1.0,
    )


def _recognize(
    node: fx.Node, role: str, heads: int, head_dim: int, found: dict[str, Any], early: bool
) -> tuple[fx.Node, bool] | None:
    """The first recognizer of this stage that matches ``node`` and has not matched yet:
    records what it found in ``found``; returns (the node it reads, whether it transforms)."""
    for recognizer in OPERAND_RECOGNIZERS:
        if recognizer.early != early or role not in recognizer.roles or recognizer.key in found:
            continue
        matched = recognizer.match(node, role, heads, head_dim)
        if matched is not None:
            found[recognizer.key], source = matched
            return source, recognizer.transforms
    return None
