"""Attention blocks: from a ``scaled_dot_product_attention`` node, or a softmax between two
matmuls, to the Q, K, V and output projections and what the scores are made of."""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from passes.discover.operand import Operand, trace_operand
from passes.discover.scores import MATMUL, ScoreChain, elementwise, score_chain
from passes.errors import DiscoverError, UnsupportedArchitectureError
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
from passes.structure import AttentionBlock, RelativeTerm

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
    if ko.heads != vo.heads:
        raise UnsupportedArchitectureError(
            f"attention at {module_label(where)} has {ko.heads} key heads but {vo.heads} value "
            f"heads; grainfx needs keys and values grouped alike"
        )
    if (qo.rope is None) != (ko.rope is None) or (
        qo.rope
        and ko.rope
        and (qo.rope.layout, qo.rope.rotary_dims) != (ko.rope.layout, ko.rope.rotary_dims)
    ):
        raise UnsupportedArchitectureError(
            f"attention at {module_label(where)} rotates queries and keys differently "
            f"({qo.rope} vs {ko.rope}); grainfx needs the same rotary layout on both"
        )
    return heads, head_dim, qo, ko, vo


def _block(
    name: str,
    kind: str,
    op: fx.Node,
    q_reader: fx.Node,
    q: fx.Node,
    ctx: fx.Node,
    heads: int,
    head_dim: int,
    ops: tuple[Operand, Operand, Operand],
    scale: float,
    **scores: Any,
) -> AttentionBlock:
    qo, ko, vo = ops
    return AttentionBlock(
        name=name,
        kind=kind,
        op=op.name,
        q=qo.projection,
        k=ko.projection,
        v=vo.projection,
        o=_context_projection(ctx, heads, head_dim),
        num_heads=heads,
        head_dim=head_dim,
        scale=scale * qo.scale * ko.scale,
        num_kv_heads=ko.heads,
        rope=qo.rope,
        rope_k=ko.rope,
        q_norm=qo.norm,
        k_norm=ko.norm,
        q_operand=q.name,
        q_reader=q_reader.name,
        **scores,
    )


def sdpa_block(node: fx.Node, name: str) -> AttentionBlock:
    """The attention block of a ``scaled_dot_product_attention`` node."""
    args: list[Any] = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    attn_mask = args[3] if args[3] is not None else node.kwargs.get("attn_mask")
    is_causal = bool(args[5] if args[5] is not None else node.kwargs.get("is_causal", False))
    heads, head_dim, qo, ko, vo = _operands(q, k, v, node)
    given: Any = node.kwargs.get("scale")
    scale = (1.0 / math.sqrt(head_dim)) if given is None else float(given)
    return _block(
        name,
        "sdpa",
        node,
        node,
        q,
        node,
        heads,
        head_dim,
        (qo, ko, vo),
        scale,
        attn_mask=attn_mask.name if isinstance(attn_mask, fx.Node) else None,
        is_causal=is_causal,
    )


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
    heads, head_dim, qo, ko, vo = _operands(
        q, arg_node(k_t, 0), arg_node(chain.context, 1), softmax
    )
    relative, relative_ops = _relative_terms(chain, q, (qo, ko, vo), heads, head_dim)
    scores: dict[str, Any] = (
        dict(score_biases=chain.biases)
        if chain.canonical and not relative
        else dict(score_ops=tuple(n.name for n in chain.ops))
    )
    if relative:
        if ko.heads != heads:
            raise UnsupportedArchitectureError(
                f"attention at {module_label(softmax)} adds relative-position terms and "
                f"shares key/value heads; grainfx prunes relative-position terms with one "
                f"key/value head per query head"
            )
        scores.update(relative=relative, relative_ops=relative_ops)
    return _block(
        name,
        "eager",
        softmax,
        chain.matmul,
        q,
        chain.context,
        heads,
        head_dim,
        (qo, ko, vo),
        chain.scale,
        **scores,
    )


_RELATIVE_DEPTH = 16


def _term_ops(
    node: fx.Node, heads: int, ops: dict[fx.Node, bool], terms: list[fx.Node], depth: int
) -> bool:
    """True when ``node`` (one entry per head) is computed from score matmuls by transposes,
    gathers along positions and elementwise ops; records those matmuls in ``terms`` and
    whether each op visited leads to one in ``ops``."""
    if is_op(node, MATMUL):
        if node not in terms:
            terms.append(node)
        return True
    if node in ops:
        return ops[node]
    dims = shape(node)
    if depth == 0 or dims is None or len(dims) != 4 or dims[1] != heads:
        return False
    if is_op(node, [aten.transpose.int, aten.gather.default]):
        inputs = [arg_node(node, 0)]
    elif elementwise(node):
        inputs = node.all_input_nodes
    else:
        inputs = []
    found = [_term_ops(a, heads, ops, terms, depth - 1) for a in inputs]
    ops[node] = any(found)
    return ops[node]


def _relative_terms(
    chain: ScoreChain,
    q: fx.Node,
    operands: tuple[Operand, Operand, Operand],
    heads: int,
    head_dim: int,
) -> tuple[tuple[RelativeTerm, ...], tuple[str, ...]]:
    """Disentangled relative-position terms added to the scores of ``chain`` (DeBERTa):
    matmuls of the block's queries or keys with projected position embeddings, and the ops
    from them to the scores. ``((), ())`` where the scores add none."""
    qo, ko, vo = operands
    inside = set(chain.ops) | {chain.matmul}
    ops: dict[fx.Node, bool] = {}
    terms: list[fx.Node] = []
    for op in chain.ops:
        for arg in op.all_input_nodes:
            if arg not in inside:
                _term_ops(arg, heads, ops, terms, _RELATIVE_DEPTH)
    found = []
    for matmul in terms:
        content, pos_t = (as_node(a) for a in matmul.args)
        role = _content_role(content, q, qo, ko, heads, head_dim)
        pos = arg_node(pos_t, 0)
        dims = shape(pos)
        if (
            role is None
            or not is_op(pos_t, [aten.transpose.int, aten.permute.default])
            or dims is None
            or dims[0] != 1
        ):
            raise UnsupportedArchitectureError(
                f"attention scores at {module_label(chain.matmul)} add a product "
                f"{module_label(matmul)} that is not the queries or keys times transposed "
                f"position embeddings (batch 1); grainfx prunes relative-position terms of "
                f"that form (DeBERTa's content-to-position and position-to-content)"
            )
        po = trace_operand(pos, "key" if role == "q" else "query", heads, head_dim)
        owner = {qo.projection.weight: qo, ko.projection.weight: ko}.get(po.projection.weight)
        if (
            po.scale != 1.0
            or po.rope is not None
            or po.norm is not None
            or po.projection.weight == vo.projection.weight
            or (owner is not None and po.projection.output_rows() != owner.projection.output_rows())
        ):
            raise UnsupportedArchitectureError(
                f"the position embeddings of relative term {module_label(matmul)} are scaled, "
                f"rotated, normed, projected by W_V or by other rows of W_Q / W_K than the "
                f"content's; grainfx prunes relative-position terms whose position projection "
                f"has one row per query/key head dim"
            )
        found.append(RelativeTerm(role, matmul.name, pos.name, po.projection))
    order = {n: i for i, n in enumerate(chain.matmul.graph.nodes)}
    relative_ops = sorted((n for n, leads in ops.items() if leads), key=order.__getitem__)
    return tuple(found), tuple(n.name for n in relative_ops)


def _content_role(
    node: fx.Node, q: fx.Node, qo: Operand, ko: Operand, heads: int, head_dim: int
) -> str | None:
    """``"q"`` or ``"k"`` when ``node`` is the block's queries or keys straight from their
    projection (no scale, rotation or norm on the way), else None."""
    if node is q and qo.scale == 1.0 and qo.rope is None and qo.norm is None:
        return "q"
    try:
        traced = trace_operand(node, "key", heads, head_dim)
    except DiscoverError:
        return None
    if traced.scale != 1.0 or traced.rope is not None or traced.norm is not None:
        return None
    if traced.projection == ko.projection:
        return "k"
    return "q" if traced.projection == qo.projection else None
