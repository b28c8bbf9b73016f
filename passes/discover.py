"""Discover: find attention blocks, FFN blocks and layer outputs from a graph's dataflow.

Attention is found from each ``scaled_dot_product_attention`` node and each softmax that sits
between two matmuls, then traced back through the head reshapes to the Q, K and V projections
(``aten.linear``, GPT-2's view-addmm-view, or a piece of a fused QKV projection) and forward
through the head merge to the output projection. An FFN is a projection whose output reaches
exactly one other projection through elementwise ops only, and whose result is added back to
the residual stream. Module names are used in messages only.

Preserves computation: it does not change the graph.
"""

from __future__ import annotations

import math

from torch import fx

from passes.errors import DiscoverError, NoAttentionFoundError, UnsupportedArchitectureError
from passes.graph import (LAYOUT_OPS, NORM_OPS, PASSTHROUGH_OPS, Projection, aten, is_op,
                          live_users, match_projection, match_projection_from_input,
                          module_label, shape, split_piece, static)
from passes.structure import AttentionBlock, FFNBlock, Structure

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_SDPA = {aten.scaled_dot_product_attention.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_GQA_OPS = {aten.expand.default, aten.repeat.default, aten.repeat_interleave.self_int,
            aten.unsqueeze.default}
_ROPE_OPS = {aten.cat.default, aten.neg.default, aten.add.Tensor, aten.sub.Tensor,
             aten.mul.Tensor, aten.slice.Tensor, aten.stack.default}
#: Pointwise ops allowed between an FFN's up and down projections.
_POINTWISE = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default,
    aten.sigmoid.default, aten.erf.default, aten.neg.default, aten.exp.default,
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
    aten.div.Tensor, aten.pow.Tensor_Scalar, aten.hardtanh.default, aten.leaky_relu.default,
    aten.elu.default, aten.clamp.default, aten.dropout.default, aten.to.dtype,
    aten._to_copy.default, aten.view.default, aten.reshape.default, aten.relu_.default,
}


def _scalar(value) -> float | None:
    """A Python number, or a constant 0-dim ``aten.full`` node, as a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and is_op(value, [aten.full.default]) and value.args[0] == []:
        return float(value.args[1])
    return None


class _HeadTrace:
    """Traces one attention operand (q, k or v) back to its projection."""

    def __init__(self, role: str, heads: int, head_dim: int):
        self.role, self.heads, self.head_dim = role, heads, head_dim
        self.scale = 1.0

    def projection(self, node: fx.Node) -> Projection:
        cur = node
        split_seen = False
        while True:
            found = self._at(cur)
            if found is not None:
                if found.out_features != self.heads * self.head_dim:
                    raise DiscoverError(
                        f"the {self.role} projection {module_label(cur)} has "
                        f"{found.out_features} outputs, not heads x head size = "
                        f"{self.heads} x {self.head_dim}; only plain head splits are supported")
                if not split_seen:
                    raise DiscoverError(
                        f"no head split between {module_label(cur)} and the attention op")
                return found
            if is_op(cur, LAYOUT_OPS):
                out = shape(cur)
                if out is not None and len(out) >= 2 and tuple(out[-2:]) == (
                        self.heads, self.head_dim):
                    split_seen = True
                cur = cur.args[0]
                continue
            factor = self._scaling(cur)
            if factor is not None:
                self.scale *= factor
                cur = cur.args[0]
                continue
            if is_op(cur, _GQA_OPS):
                raise UnsupportedArchitectureError(
                    f"the {self.role} of attention reaches {module_label(cur)} "
                    f"({cur.target}): key/value heads shared by several query heads (GQA/MQA) "
                    f"are not supported yet; use a model with one key/value head per query head")
            if is_op(cur, _ROPE_OPS):
                raise UnsupportedArchitectureError(
                    f"the {self.role} of attention goes through {module_label(cur)} "
                    f"({cur.target}) before its projection: rotary position embeddings (RoPE) "
                    f"are not supported yet; use a model with absolute or additive positions")
            raise DiscoverError(
                f"cannot trace the {self.role} of attention through {module_label(cur)} "
                f"({cur.target}) back to a projection; supported are linear / Conv1D "
                f"projections, fused QKV splits and view/transpose head splits")

    @staticmethod
    def _at(node: fx.Node) -> Projection | None:
        found = match_projection(node)
        if found is not None:
            return found
        piece = split_piece(node)
        if piece is not None:
            src, start, stop = piece
            fused = match_projection(src)
            if fused is not None:
                return fused.with_slice(node.name, fused.start + start, fused.start + stop)
        return None

    @staticmethod
    def _scaling(node: fx.Node) -> float | None:
        if is_op(node, [aten.mul.Tensor, aten.mul.Scalar]):
            factor = _scalar(node.args[1])
            return factor
        if is_op(node, [aten.div.Tensor, aten.div.Scalar]):
            divisor = _scalar(node.args[1])
            return None if divisor is None else 1.0 / divisor
        return None


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


def _sdpa_block(node: fx.Node, name: str) -> AttentionBlock:
    args = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    attn_mask = args[3] if args[3] is not None else node.kwargs.get("attn_mask")
    is_causal = bool(args[5] if args[5] is not None else node.kwargs.get("is_causal", False))
    if node.kwargs.get("enable_gqa"):
        raise UnsupportedArchitectureError(
            f"attention at {module_label(node)} uses grouped-query attention (enable_gqa), "
            f"which is not supported yet")
    heads, head_dim = _head_layout(q, node)
    if shape(k) is not None and static(shape(k)[1]) != heads:
        raise UnsupportedArchitectureError(
            f"attention at {module_label(node)} has {shape(k)[1]} key heads for {heads} query "
            f"heads (GQA/MQA), which is not supported yet")
    traces = {r: _HeadTrace(r, heads, head_dim) for r in ("query", "key", "value")}
    qp, kp, vp = (traces[r].projection(n) for r, n in zip(traces, (q, k, v)))
    scale = node.kwargs.get("scale")
    scale = (1.0 / math.sqrt(head_dim)) if scale is None else float(scale)
    scale *= traces["query"].scale * traces["key"].scale
    _check_value_scale(traces["value"], node)
    return AttentionBlock(name=name, kind="sdpa", op=node.name, q=qp, k=kp, v=vp,
                          o=_context_projection(node, heads, head_dim), num_heads=heads,
                          head_dim=head_dim, scale=scale,
                          attn_mask=attn_mask.name if isinstance(attn_mask, fx.Node) else None,
                          is_causal=is_causal)


def _check_value_scale(trace: _HeadTrace, node: fx.Node) -> None:
    if trace.scale != 1.0:
        raise DiscoverError(f"the values of attention at {module_label(node)} are scaled; "
                            f"only query/key scaling is supported")


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


def _eager_block(softmax: fx.Node, name: str) -> AttentionBlock | None:
    """An attention block around ``softmax``, or None if this softmax is not attention."""
    cur, scale, biases, scaled = softmax.args[0], 1.0, [], False
    while not is_op(cur, _MATMUL):
        if is_op(cur, [aten.add.Tensor]):
            a, b = cur.args[0], cur.args[1]
            chain, bias = (a, b) if isinstance(a, fx.Node) and _score_chain(a) else (b, a)
            if not isinstance(chain, fx.Node) or not _score_chain(chain):
                return None
            if scaled:
                raise DiscoverError(f"attention scores at {module_label(cur)} get a bias before "
                                    f"their scaling; only scale-then-bias is supported")
            biases.append(bias.name)
            cur = chain
            continue
        factor = _HeadTrace._scaling(cur)
        if factor is not None:
            scale, scaled, cur = scale * factor, True, cur.args[0]
            continue
        if is_op(cur, PASSTHROUGH_OPS):
            cur = cur.args[0]
            continue
        return None
    q, k_t = cur.args
    probs = softmax
    while True:
        users = live_users(probs)
        if len(users) != 1:
            return None
        user = users[0]
        if is_op(user, _MATMUL) and user.args[0] is probs:
            ctx, v = user, user.args[1]
            break
        if not is_op(user, PASSTHROUGH_OPS):
            return None
        probs = user
    if not is_op(k_t, [aten.transpose.int, aten.permute.default]):
        raise DiscoverError(f"the keys of attention at {module_label(cur)} are not transposed "
                            f"for q @ k^T")
    heads, head_dim = _head_layout(q, softmax)
    traces = {r: _HeadTrace(r, heads, head_dim) for r in ("query", "key", "value")}
    qp, kp, vp = (traces[r].projection(n) for r, n in zip(traces, (q, k_t.args[0], v)))
    _check_value_scale(traces["value"], softmax)
    scale *= traces["query"].scale * traces["key"].scale
    return AttentionBlock(name=name, kind="eager", op=softmax.name, q=qp, k=kp, v=vp,
                          o=_context_projection(ctx, heads, head_dim), num_heads=heads,
                          head_dim=head_dim, scale=scale, score_biases=tuple(reversed(biases)))


def _residual(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Follow ``node`` through identity ops to a residual add: (add, other operand)."""
    cur = node
    while True:
        users = live_users(cur)
        if len(users) != 1:
            return None
        user = users[0]
        if is_op(user, [aten.add.Tensor]):
            other = user.args[1] if user.args[0] is cur else user.args[0]
            if isinstance(other, fx.Node) and shape(other) == shape(cur):
                return user, other
            return None
        if not is_op(user, PASSTHROUGH_OPS):
            return None
        cur = user


def _is_residual_of(other: fx.Node, x: fx.Node) -> bool:
    """``other`` is the residual stream that block input ``x`` was read from."""
    if other is x:
        return True
    return is_op(x, NORM_OPS) and x.args[0] is other


def _ffn_region(down: Projection, graph_nodes: dict[str, fx.Node]
                ) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """Walk back from the down projection's input: (region nodes, projection leaves)."""
    start = graph_nodes[down.input]
    region, leaves, stack, seen = [], [], [start], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        proj = match_projection(node)
        if proj is not None:
            leaves.append(node)
            continue
        if not is_op(node, _POINTWISE):
            return None
        region.append(node)
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        for arg in tensor_args:
            if _scalar(arg) is None:
                stack.append(arg)
    return region, leaves


def _ffn_block(down_node: fx.Node, taken: set[str], nodes: dict[str, fx.Node],
               name: str) -> tuple[FFNBlock, fx.Node] | None:
    down = match_projection(down_node)
    if down is None or down.node in taken:
        return None
    walked = _ffn_region(down, nodes)
    if walked is None:
        return None
    region, leaves = walked
    if not region or not 1 <= len(leaves) <= 2:
        return None
    projs = [match_projection(leaf) for leaf in leaves]
    if any(p.node in taken for p in projs) or len({p.input for p in projs}) != 1:
        return None
    if any(p.out_features != down.in_features for p in projs):
        return None
    inside = set(region) | set(leaves) | {nodes[down.input_user]}
    for node in region + leaves:
        if any(u not in inside for u in live_users(node)):
            return None
    residual = _residual(down_node)
    if residual is None or not _is_residual_of(residual[1], nodes[projs[0].input]):
        return None
    if len(projs) == 2:
        direct = [p for p, leaf in zip(projs, leaves)
                  if any(is_op(u, [aten.mul.Tensor]) for u in live_users(leaf))]
        up = direct[0] if len(direct) == 1 else projs[0]
        gate = projs[1] if up is projs[0] else projs[0]
    else:
        up, gate = projs[0], None
    block = FFNBlock(name=name, up=up, down=down, gate=gate,
                     region=tuple(n.name for n in region))
    return block, residual[0]


def _layer_output(add: fx.Node) -> fx.Node:
    users = live_users(add)
    if len(users) == 1 and is_op(users[0], NORM_OPS):
        return users[0]
    return add


def discover(gm: fx.GraphModule) -> Structure:
    """Find the attention blocks, FFN blocks, layer outputs and prunable units of ``gm``.

    Raises:
        NoAttentionFoundError: the graph has no attention block.
        UnsupportedArchitectureError: attention uses RoPE or GQA (not supported yet).
        DiscoverError: an attention pattern that cannot be traced; the message names the node.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    attention: list[AttentionBlock] = []
    for node in gm.graph.nodes:
        name = f"attn{len(attention)}"
        if is_op(node, _SDPA):
            attention.append(_sdpa_block(node, name))
        elif is_op(node, _SOFTMAX) and node.args[0] is not None:
            block = _eager_block(node, name)
            if block is not None:
                attention.append(block)
    if not attention:
        raise NoAttentionFoundError(
            f"no attention found in the graph of {len(nodes)} nodes: grainfx looks for "
            f"scaled_dot_product_attention or matmul-softmax-matmul between projections; pass "
            f"a transformer model (print(gm.graph) shows what was captured)")
    taken = {p.node for b in attention for p in (b.q, b.k, b.v, b.o)}
    ffn: list[FFNBlock] = []
    ffn_adds: list[fx.Node] = []
    for node in gm.graph.nodes:
        found = _ffn_block(node, taken, nodes, f"ffn{len(ffn)}")
        if found is not None:
            block, add = found
            ffn.append(block)
            ffn_adds.append(add)
            taken.update(p.node for p in (block.up, block.down, block.gate) if p is not None)
    first = _residual(nodes[attention[0].o.node])
    embedding = first[1] if first is not None else nodes[attention[0].q.input]
    layer_outputs = [embedding.name] + [_layer_output(add).name for add in ffn_adds]
    params = {id(p): p.numel() for p in gm.parameters()}
    return Structure(attention=tuple(attention), ffn=tuple(ffn),
                     layer_outputs=tuple(layer_outputs), total_params=sum(params.values()))
