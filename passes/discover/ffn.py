"""FFN blocks: a projection whose output reaches exactly one other projection through
elementwise ops only (an activation, a gate product), added back to the residual stream.

The up and gate projections may be two linears or two pieces of one fused linear (Phi-3's
``gate_up_proj``); the block input may come from the residual stream through a norm
(LayerNorm or a decomposed RMSNorm).
"""

from __future__ import annotations

import operator

from torch import fx

from passes.discover.common import scalar, strip
from passes.discover.head_norm import norm_region
from passes.graph import (
    ADD_OPS,
    SPLIT_OPS,
    Projection,
    arg_node,
    aten,
    feature_rows,
    is_op,
    live_users,
    match_projection,
    shape,
    through_passthrough,
)
from passes.structure import FFNBlock

#: Pointwise ops allowed between an FFN's up and down projections.
_POINTWISE = {
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.erf.default,
    aten.neg.default,
    aten.exp.default,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.pow.Tensor_Scalar,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.clamp.default,
    aten.dropout.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.view.default,
    aten.reshape.default,
    aten.relu_.default,
}


def _piece(node: fx.Node) -> Projection | None:
    """``node`` as a projection: a whole one, or a split / chunk piece of a fused one."""
    found = match_projection(node)
    if found is not None:
        return found
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    split = arg_node(node, 0)
    if not is_op(split, SPLIT_OPS - {aten.unbind.int}):
        return None
    fused = match_projection(arg_node(split, 0))
    if fused is None:
        return None
    rows = feature_rows(arg_node(split, 0), [split, node])
    if rows is None:
        return None
    return fused.with_rows(node.name, rows)


def _region(
    down: Projection, nodes: dict[str, fx.Node]
) -> tuple[list[fx.Node], list[fx.Node], list[Projection]] | None:
    """Walk back from the down projection's input: (region nodes, leaves, leaf projections)."""
    region, leaves, projs, stack, seen = [], [], [], [nodes[down.input]], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        proj = _piece(node)
        if proj is not None:
            leaves.append(node)
            projs.append(proj)
            continue
        if not is_op(node, _POINTWISE):
            return None
        region.append(node)
        stack.extend(a for a in node.args if isinstance(a, fx.Node) and scalar(a) is None)
    return region, leaves, projs


def _post_norm(x: fx.Node, steps: int = 12) -> tuple[fx.Node, fx.Node] | None:
    """(norm output, add) where ``x`` is normed over the last dim before it is added (Gemma 2's
    post-attention and post-FFN norms), else None."""
    frontier, seen = [x], {x}
    for _ in range(steps):
        frontier = [u for n in frontier for u in live_users(n) if u not in seen]
        seen.update(frontier)
        for add in frontier:
            if not is_op(add, [aten.add.Tensor]):
                continue
            for normed in add.args[:2]:
                if not isinstance(normed, fx.Node) or normed not in seen:
                    continue
                found = norm_region(normed, stop=x)
                if found is not None and found[0] is strip(x):
                    return normed, add
    return None


def _layer_scale(node: fx.Node) -> bool:
    """``x * gamma`` with a parameter ``gamma`` (DINOv2's and CaiT's layer scale) or a
    constant (Granite's residual multiplier)."""
    return is_op(node, [aten.mul.Tensor, aten.mul.Scalar]) and any(
        (isinstance(a, fx.Node) and a.op == "get_attr") or scalar(a) is not None
        for a in node.args[:2]
    )


def residual(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Follow ``node`` through identity ops (a layer scale, a post-norm) to a residual add:
    (add, other operand)."""
    found = through_passthrough(node)
    while found is not None and _layer_scale(found[1]):
        found = through_passthrough(found[1])
    if found is None or not is_op(found[1], ADD_OPS):
        found = _post_norm(node if found is None else found[0])
        if found is None:
            return None
    cur, add = found
    other = add.args[1] if add.args[0] is cur else add.args[0]
    if isinstance(other, fx.Node) and shape(other) == shape(cur):
        return add, other
    return None


def residual_of(out: fx.Node, x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The add that puts block output ``out`` back on the residual stream that the block
    input ``x`` was read from, and that stream; None when there is none. In a parallel block
    (GPT-J, GPT-NeoX) ``out`` is first added to the attention output, then to the stream, or
    to the sum of the stream and the attention output (Cohere)."""
    found = residual(out)
    if found is None:
        return None
    if reads_residual(x, found[1]):
        return found
    other = found[1]
    if is_op(other, ADD_OPS) and any(
        isinstance(a, fx.Node) and reads_residual(x, a) for a in other.args[:2]
    ):
        return found[0], other  # Cohere: (stream + attention) + FFN
    outer = residual(found[0])
    if outer is not None and reads_residual(x, outer[1]):
        return outer
    return None


def stream_of(x: fx.Node) -> fx.Node:
    """The residual stream that block input ``x`` reads: ``x`` or the source of its norm."""
    found = norm_region(x)
    return found[0] if found is not None else x


def reads_residual(x: fx.Node, stream: fx.Node) -> bool:
    """``x`` is the residual ``stream`` itself or a norm of it."""
    if strip(x) is strip(stream):
        return True
    found = norm_region(x, stop=stream)
    return found is not None and strip(found[0]) is strip(stream)


def ffn_block(
    down_node: fx.Node, taken: set[str], nodes: dict[str, fx.Node], name: str
) -> tuple[FFNBlock, fx.Node] | None:
    """The FFN block whose down projection is ``down_node`` and its residual add, or None."""
    down = match_projection(down_node)
    if down is None or down.node in taken:
        return None
    walked = _region(down, nodes)
    if walked is None:
        return None
    region, leaves, projs = walked
    if not region or not 1 <= len(leaves) <= 2:
        return None
    if any(p.node in taken for p in projs) or len({p.input for p in projs}) != 1:
        return None
    if any(p.out_features != down.in_features for p in projs):
        return None
    inside = set(region) | set(leaves) | {nodes[down.input_user]}
    for node in region + leaves:
        if any(u not in inside for u in live_users(node)):
            return None
    found = residual_of(down_node, nodes[projs[0].input])
    if found is None:
        return None
    if len(projs) == 2:
        direct = [
            p
            for p, leaf in zip(projs, leaves, strict=False)
            if any(is_op(u, [aten.mul.Tensor]) for u in live_users(leaf))
        ]
        up = direct[0] if len(direct) == 1 else projs[0]
        gate = projs[1] if up is projs[0] else projs[0]
    else:
        up, gate = projs[0], None
    block = FFNBlock(name=name, up=up, down=down, gate=gate, region=tuple(n.name for n in region))
    return block, found[0]
