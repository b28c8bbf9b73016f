"""Attention blocks: from a ``scaled_dot_product_attention`` node, or a softmax between two
matmuls, to the Q, K, V and output projections (the core of a block), then the attention
features it has (:mod:`passes.features`: RoPE, GQA, head norms, relative-position terms,
what the scores are made of)."""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from passes.discover.operand import Operand, trace_operand
from passes.discover.scores import ScoreChain, score_chain
from passes.errors import DiscoverError
from passes.features import AttentionFeature, Traced
from passes.features.registry import FEATURES
from passes.graph import (
    LAYOUT_OPS,
    Projection,
    arg_node,
    as_node,
    aten,
    is_op,
    live_users,
    match_projection_from_input,
    module_label,
    shape,
    static,
)
from passes.structure import AttentionBlock

SOFTMAX = {aten.softmax.int, aten._softmax.default}
SDPA = {aten.scaled_dot_product_attention.default}


def _head_layout(q: fx.Node, where: fx.Node) -> tuple[int, int]:
    dims = shape(q)
    if dims is None or len(dims) != 4 or static(dims[1]) is None or static(dims[3]) is None:
        raise DiscoverError(
            f"attention at {module_label(where)} does not read queries of shape "
            f"(batch, heads, seq, head size) with static heads and head size"
        )
    return int(dims[1]), int(dims[3])


def _context_projection(ctx: fx.Node, heads: int, head_dim: int) -> Projection:
    cur = ctx
    while True:
        found = match_projection_from_input(cur)
        out = shape(cur)
        if found is not None and out is not None and static(out[-1]) == heads * head_dim:
            return found
        users = live_users(cur)
        if len(users) != 1 or not is_op(users[0], LAYOUT_OPS):
            raise DiscoverError(
                f"cannot follow the attention output {module_label(ctx)} through "
                f"{module_label(cur)} to an output projection; supported are head merges by "
                f"transpose/reshape into one linear or Conv1D"
            )
        cur = users[0]


def _operands(
    q: fx.Node, k: fx.Node, v: fx.Node, where: fx.Node
) -> tuple[int, int, Operand, Operand, Operand]:
    heads, head_dim = _head_layout(q, where)
    qo = trace_operand(q, "query", heads, head_dim)
    k_dims = shape(k)
    kv_heads = static(k_dims[1]) if k_dims is not None else None
    if kv_heads is None or heads % kv_heads:
        raise DiscoverError(
            f"the keys of attention at {module_label(where)} do not have a "
            f"static number of heads that divides the {heads} query heads"
        )
    ko = trace_operand(k, "key", kv_heads, head_dim)
    vo = trace_operand(v, "value", kv_heads, head_dim)
    return heads, head_dim, qo, ko, vo


def _block(
    name: str,
    kind: str,
    q_reader: fx.Node,
    ctx: fx.Node,
    traced: Traced,
    scale: float,
    is_causal: bool = False,
) -> AttentionBlock:
    """The block of ``traced`` with the features of :data:`passes.features.registry.
    FEATURES` it has, in that order."""
    found: tuple[AttentionFeature, ...] = ()
    for feature in FEATURES:
        instance = feature.find(traced, found)
        if instance is not None:
            found += (instance,)
    qo, ko, vo = traced.query, traced.key, traced.value
    return AttentionBlock(
        name=name,
        kind=kind,
        op=traced.where.name,
        q=qo.projection,
        k=ko.projection,
        v=vo.projection,
        o=_context_projection(ctx, traced.heads, traced.head_dim),
        num_heads=traced.heads,
        head_dim=traced.head_dim,
        scale=scale * qo.scale * ko.scale,
        is_causal=is_causal,
        q_operand=traced.q.name,
        q_reader=q_reader.name,
        features=found,
    )


def _traced(where: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, chain: ScoreChain | None) -> Traced:
    heads, head_dim, qo, ko, vo = _operands(q, k, v, where)

    def trace(node: fx.Node, role: str) -> Operand:
        return trace_operand(node, role, heads, head_dim)

    return Traced(where, q, heads, head_dim, qo, ko, vo, chain, trace)


def sdpa_block(node: fx.Node, name: str) -> AttentionBlock:
    """The attention block of a ``scaled_dot_product_attention`` node."""
    args: list[Any] = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    is_causal = bool(args[5] if args[5] is not None else node.kwargs.get("is_causal", False))
    traced = _traced(node, q, k, v, None)
    given: Any = node.kwargs.get("scale")
    scale = (1.0 / math.sqrt(traced.head_dim)) if given is None else float(given)
    return _block(name, "sdpa", node, node, traced, scale, is_causal)


def eager_block(softmax: fx.Node, name: str) -> AttentionBlock | None:
    """An attention block around ``softmax``, or None if this softmax is not attention."""
    chain = score_chain(softmax)
    if chain is None:
        return None
    q, k_t = (as_node(a) for a in chain.matmul.args)
    if not is_op(k_t, [aten.transpose.int, aten.permute.default]):
        raise DiscoverError(
            f"the keys of attention at {module_label(chain.matmul)} are not transposed for q @ k^T"
        )
    traced = _traced(softmax, q, arg_node(k_t, 0), arg_node(chain.context, 1), chain)
    return _block(name, "eager", chain.matmul, chain.context, traced, chain.scale)
