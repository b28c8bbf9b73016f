"""Attention blocks: from a ``scaled_dot_product_attention`` node, or a softmax between two
matmuls, to the Q, K, V and output projections and what the scores are made of."""

from __future__ import annotations

import math

from torch import fx

from passes.discover.operand import Operand, scaling, trace_operand
from passes.errors import DiscoverError, UnsupportedArchitectureError
from passes.graph import (LAYOUT_OPS, PASSTHROUGH_OPS, Projection, aten, is_op, live_users,
                          match_projection_from_input, module_label, shape, static,
                          through_passthrough)
from passes.structure import AttentionBlock

SOFTMAX = {aten.softmax.int, aten._softmax.default}
SDPA = {aten.scaled_dot_product_attention.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}


def _head_layout(q: fx.Node, where: fx.Node) -> tuple[int, int]:
    dims = shape(q)
    if dims is None or len(dims) != 4 or static(dims[1]) is None or static(dims[3]) is None:
        raise DiscoverError(
            f"attention at {module_label(where)} does not read queries of shape "
            f"(batch, heads, seq, head size) with static heads and head size")
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
                f"transpose/reshape into one linear or Conv1D")
        cur = users[0]


def _operands(q: fx.Node, k: fx.Node, v: fx.Node, where: fx.Node
              ) -> tuple[int, int, Operand, Operand, Operand]:
    heads, head_dim = _head_layout(q, where)
    qo = trace_operand(q, "query", heads, head_dim)
    kv_heads = static(shape(k)[1]) if shape(k) is not None else None
    if kv_heads is None or heads % kv_heads:
        raise DiscoverError(f"the keys of attention at {module_label(where)} do not have a "
                            f"static number of heads that divides the {heads} query heads")
    ko = trace_operand(k, "key", kv_heads, head_dim)
    vo = trace_operand(v, "value", kv_heads, head_dim)
    if ko.heads != vo.heads:
        raise UnsupportedArchitectureError(
            f"attention at {module_label(where)} has {ko.heads} key heads but {vo.heads} value "
            f"heads; grainfx needs keys and values grouped alike")
    if (qo.rope is None) != (ko.rope is None) or (qo.rope and (
            qo.rope.layout, qo.rope.rotary_dims) != (ko.rope.layout, ko.rope.rotary_dims)):
        raise UnsupportedArchitectureError(
            f"attention at {module_label(where)} rotates queries and keys differently "
            f"({qo.rope} vs {ko.rope}); grainfx needs the same rotary layout on both")
    return heads, head_dim, qo, ko, vo


def _block(name: str, kind: str, op: fx.Node, q_reader: fx.Node, q: fx.Node, ctx: fx.Node,
           heads: int, head_dim: int, ops: tuple[Operand, Operand, Operand], scale: float,
           **scores) -> AttentionBlock:
    qo, ko, vo = ops
    return AttentionBlock(
        name=name, kind=kind, op=op.name, q=qo.projection, k=ko.projection, v=vo.projection,
        o=_context_projection(ctx, heads, head_dim), num_heads=heads, head_dim=head_dim,
        scale=scale * qo.scale * ko.scale, num_kv_heads=ko.heads, rope=qo.rope,
        rope_k=ko.rope, q_norm=qo.norm, k_norm=ko.norm, q_operand=q.name,
        q_reader=q_reader.name, **scores)


def sdpa_block(node: fx.Node, name: str) -> AttentionBlock:
    """The attention block of a ``scaled_dot_product_attention`` node."""
    args = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    attn_mask = args[3] if args[3] is not None else node.kwargs.get("attn_mask")
    is_causal = bool(args[5] if args[5] is not None else node.kwargs.get("is_causal", False))
    heads, head_dim, *ops = _operands(q, k, v, node)
    scale = node.kwargs.get("scale")
    scale = (1.0 / math.sqrt(head_dim)) if scale is None else float(scale)
    return _block(name, "sdpa", node, node, q, node, heads, head_dim, tuple(ops), scale,
                  attn_mask=attn_mask.name if isinstance(attn_mask, fx.Node) else None,
                  is_causal=is_causal)


def _score_chain(node: fx.Node) -> bool:
    """True when ``node`` is (a scaled / biased version of) a q.k matmul."""
    while True:
        if is_op(node, _MATMUL):
            return True
        if is_op(node, [aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
                        aten.add.Tensor] + list(PASSTHROUGH_OPS)):
            node = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
            if not isinstance(node, fx.Node):
                return False
            continue
        return False


def _refuse_unknown_scores(candidates: list[fx.Node], steps: int = 6) -> None:
    """Raise when a few first-argument steps back from a candidate lead to a matmul: scores
    pass through an op that the rewrite cannot replay yet (soft-capping's tanh)."""
    for start in candidates:
        node, path = start, []
        for _ in range(steps):
            if is_op(node, _MATMUL):
                unknown = [n for n in path if scaling(n) is None and not is_op(
                    n, [aten.add.Tensor] + list(PASSTHROUGH_OPS))]
                if unknown:
                    raise UnsupportedArchitectureError(
                        f"attention scores at {module_label(unknown[0])} pass through "
                        f"{unknown[0].target} between the q.k matmul and the softmax "
                        f"(soft-capping?); grainfx replays only scales, additive biases and "
                        f"casts there for now")
                break
            if node.op != "call_function" or not node.args or not isinstance(node.args[0],
                                                                              fx.Node):
                break
            path.append(node)
            node = node.args[0]


def eager_block(softmax: fx.Node, name: str) -> AttentionBlock | None:
    """An attention block around ``softmax``, or None if this softmax is not attention."""
    cur, scale, biases, scaled = softmax.args[0], 1.0, [], False
    while not is_op(cur, _MATMUL):
        if is_op(cur, [aten.add.Tensor]):
            a, b = cur.args[0], cur.args[1]
            chain, bias = (a, b) if isinstance(a, fx.Node) and _score_chain(a) else (b, a)
            if not isinstance(chain, fx.Node) or not _score_chain(chain):
                _refuse_unknown_scores([x for x in (a, b) if isinstance(x, fx.Node)])
                return None
            if scaled:
                raise DiscoverError(f"attention scores at {module_label(cur)} get a bias before "
                                    f"their scaling; only scale-then-bias is supported")
            biases.append(bias.name)
            cur = chain
            continue
        factor = scaling(cur)
        if factor is not None:
            scale, scaled, cur = scale * factor, True, cur.args[0]
            continue
        if is_op(cur, PASSTHROUGH_OPS):
            cur = cur.args[0]
            continue
        _refuse_unknown_scores([cur])
        return None
    scores = cur
    q, k_t = scores.args
    found = through_passthrough(softmax)
    if found is None or not is_op(found[1], _MATMUL) or found[1].args[0] is not found[0]:
        return None
    ctx, v = found[1], found[1].args[1]
    if not is_op(k_t, [aten.transpose.int, aten.permute.default]):
        raise DiscoverError(f"the keys of attention at {module_label(cur)} are not transposed "
                            f"for q @ k^T")
    heads, head_dim, *ops = _operands(q, k_t.args[0], v, softmax)
    return _block(name, "eager", softmax, scores, q, ctx, heads, head_dim, tuple(ops), scale,
                  score_biases=tuple(reversed(biases)))
