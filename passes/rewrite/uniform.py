"""Heads without query units: attention without scores.

A head whose query units are all pruned has a zero query, so its scores ``q.k`` (times any
scale) are 0 for every key. When nothing else that is added to the scores depends on the
position, its softmax is uniform over the keys the mask lets through, and its output is the
mean of its values over those keys: no sequence x sequence work at all.

:func:`uniform_plan` reads the mask of a block from the graph and decides whether that holds
and how: transformers builds its masks as a conjunction of a key-only padding factor
(batch, 1, 1, keys) and position factors computed from ``arange`` (``q >= 0`` for
bidirectional attention, ``k <= q`` for causal attention, ``k > q - w`` for a sliding window).
The padding factor is used as it is; each position factor must be recognised as always true
or causal, else (a sliding window, a relative position bias, ALiBi, a per-head mask, a score
chain other than a scale and one mask) the block keeps the scores path. What is added to the
scores comes from the block's features (:meth:`passes.features.AttentionFeature.
uniform_biases`). :func:`emit_uniform`
emits the masked mean (bidirectional) or the running mean (causal) of the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from passes.graph import PASSTHROUGH_OPS, as_node, aten, is_op, shape, static
from passes.rewrite.emit import Emitter
from passes.structure import AttentionBlock

#: Ops that leave a boolean mask (or an index tensor) as it is, up to a broadcast.
_KEEP = (PASSTHROUGH_OPS - {aten.dropout.default}) | {
    aten.to.device,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.alias.default,
}
_AND = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default}
_TRUE = {aten.new_ones.default, aten.ones.default, aten.ones_like.default}
#: Comparisons, as ``a OP b``: the sign of ``a - b`` they accept.
_COMPARE = {
    aten.le.Tensor: "le",
    aten.le.Scalar: "le",
    aten.lt.Tensor: "lt",
    aten.lt.Scalar: "lt",
    aten.ge.Tensor: "ge",
    aten.ge.Scalar: "ge",
    aten.gt.Tensor: "gt",
    aten.gt.Scalar: "gt",
}
#: A masked-out score at or below this is exactly 0 after the softmax (exp underflows).
_MASKED = -1e4


@dataclass(frozen=True)
class UniformPlan:
    """How heads with a zero query attend in one block.

    ``keys`` names boolean tensors of shape (batch or 1, 1, 1, keys), the keys the mask lets
    through (all of them must; none: every key); ``causal``: query i also only sees keys up to
    i. ``empty`` is what a query that no key is let through gets from the masked model:
    ``"zero"`` (sdpa), ``"nan"`` (a softmax of -inf) or ``"mean"`` (a finite masked value:
    uniform over all keys).
    """

    keys: tuple[str, ...]
    causal: bool
    empty: str

    def __post_init__(self) -> None:
        if self.empty not in ("zero", "nan", "mean"):
            raise ValueError(f"empty must be 'zero', 'nan' or 'mean', got {self.empty!r}")


def _strip(node: fx.Node) -> fx.Node:
    """``node`` without casts, broadcasts and full slices in front of it."""
    while True:
        if is_op(node, _KEEP):
            node = as_node(node.args[0])
        elif is_op(node, [aten.slice.Tensor]) and _full_slice(node):
            node = as_node(node.args[0])
        else:
            return node


def _full_slice(node: fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full_end = end is None or (isinstance(end, int) and end >= 2**62)
    return start in (0, None) and full_end and isinstance(step, int) and step == 1


def _is_bool(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def _factors(node: fx.Node) -> list[fx.Node]:
    """The leaves of a conjunction of boolean tensors (casts and broadcasts stripped)."""
    node = _strip(node)
    if is_op(node, _AND) or (is_op(node, [aten.mul.Tensor]) and _is_bool(node)):
        return [f for a in node.args[:2] if isinstance(a, fx.Node) for f in _factors(a)]
    return [node]


def _index(arg: object) -> tuple[str, int] | int | None:
    """``(axis, offset)`` for a query ("q") or key ("k") position index plus a constant, the
    int itself for a constant, None for anything else."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg
    if not isinstance(arg, fx.Node):
        return None
    dims = shape(arg)
    if dims is None or len(dims) < 2:
        return None
    if static(dims[-1]) == 1 and static(dims[-2]) != 1:
        axis, length = "q", dims[-2]
    elif static(dims[-2]) == 1 and static(dims[-1]) != 1:
        axis, length = "k", dims[-1]
    else:
        return None
    offset, node = 0, arg
    while True:
        node = _strip(node)
        other = node.args[1] if len(node.args) > 1 else None
        if is_op(node, [aten.add.Tensor, aten.add.Scalar]) and isinstance(other, int):
            offset += other
        elif is_op(node, [aten.sub.Tensor, aten.sub.Scalar]) and isinstance(other, int):
            offset -= other
        elif is_op(node, [aten.arange.default, aten.arange.start, aten.arange.start_step]):
            return _arange(node, axis, offset, length)
        else:
            return None
        node = as_node(node.args[0])


def _arange(node: fx.Node, axis: str, offset: int, length: object) -> tuple[str, int] | None:
    """``(axis, offset + start)`` for an ``arange`` of step 1 as long as the ``axis`` it
    indexes (a broadcast arange of another length would not be the position)."""
    start = node.args[0] if node.target is not aten.arange.default else 0
    step = node.args[2] if node.target is aten.arange.start_step else 1
    dims = shape(node)
    if not isinstance(start, int) or step != 1 or dims is None or str(dims[0]) != str(length):
        return None
    return axis, offset + start


def _position(node: fx.Node) -> str | None:
    """``"all"`` for a position factor that is always true (``q >= 0``), ``"causal"`` for
    ``k <= q``, None for any other (a sliding window, an offset diagonal)."""
    op = next((name for target, name in _COMPARE.items() if is_op(node, [target])), None)
    if op is None or len(node.args) < 2:
        return None
    a, b = _index(node.args[0]), _index(node.args[1])
    if isinstance(a, int) and isinstance(b, tuple):  # t OP i  ==  i (reversed OP) t
        a, b, op = b, a, {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[op]
    if isinstance(a, tuple) and isinstance(b, int):  # positions are >= 0
        lowest = a[1]
        return "all" if (op == "ge" and lowest >= b) or (op == "gt" and lowest > b) else None
    if not (isinstance(a, tuple) and isinstance(b, tuple)) or a[0] == b[0]:
        return None
    if op in ("ge", "gt"):  # a >= b  ==  b <= a
        a, b, op = b, a, "le" if op == "ge" else "lt"
    # a OP b with a, b = (axis, offset): causal when a is the key and k <= q exactly
    (axis_a, off_a), (_, off_b) = a, b
    shift = off_b - off_a - (1 if op == "lt" else 0)  # k <= q + shift
    return "causal" if axis_a == "k" and shift == 0 else None


def _conjunction(mask: fx.Node, block: AttentionBlock) -> tuple[tuple[str, ...], bool] | None:
    """(key factors, causal) of a boolean mask that is a conjunction of a key-only factor
    and recognised position factors, else None."""
    keys: list[str] = []
    causal = False
    for leaf in _factors(mask):
        dims = shape(leaf)
        if dims is None or not _is_bool(leaf):
            return None
        if is_op(leaf, _TRUE):
            continue
        kind = _position(leaf)
        if kind == "causal":
            causal = True
        elif kind is None:
            if len(dims) != 4 or static(dims[1]) != 1 or static(dims[2]) != 1:
                return None  # a per-head or per-query data factor
            keys.append(leaf.name)
    if causal and block.q.input != block.k.input:
        return None  # causal cross attention: query i is not key i
    return tuple(keys), causal


def _where_mask(bias: fx.Node) -> tuple[fx.Node, float] | None:
    """(boolean mask, masked value) of ``where(mask, 0, value)`` with a value that the
    softmax turns into an exact 0 beside any allowed key."""
    node = _strip(bias)
    if not is_op(node, [aten.where.ScalarOther, aten.where.Scalar, aten.where.self]):
        return None
    cond, kept, fill = node.args[:3]
    if isinstance(fill, fx.Node):
        fill_node = _strip(fill)
        if not is_op(fill_node, [aten.full.default]):
            return None
        fill = fill_node.args[1]
    zero = kept == 0 or (
        isinstance(kept, fx.Node)
        and is_op(_strip(kept), [aten.zeros.default, aten.zeros_like.default])
    )
    if not zero or not isinstance(fill, (int, float)) or not fill <= _MASKED:
        return None
    if not isinstance(cond, fx.Node) or not _is_bool(cond):
        return None
    return cond, float(fill)


def uniform_plan(nodes: dict[str, fx.Node], block: AttentionBlock) -> UniformPlan | None:
    """How heads without query units of ``block`` attend, or None when their attention is not
    uniform over the keys the mask lets through (or this cannot be shown from the graph)."""
    biases: list[str] = []
    for feature in block.features:
        added = feature.uniform_biases(nodes, block)
        if added is None:
            return None
        biases += added
    empty = "zero" if block.kind == "sdpa" else "nan"
    if not biases:
        if block.is_causal and block.q.input != block.k.input:
            return None
        return UniformPlan((), block.is_causal, empty)
    if len(biases) > 1:
        return None
    bias = nodes[biases[0]]
    where = None if _is_bool(bias) else _where_mask(bias)
    if where is None and not (_is_bool(bias) and block.kind == "sdpa"):
        return None
    mask = bias
    if where is not None:
        mask, fill = where
        if math.isfinite(fill):
            empty = "mean"
    found = _conjunction(mask, block)
    if found is None:
        return None
    keys, causal = found
    return UniformPlan(keys, causal or block.is_causal, empty)


def emit_uniform(
    emit: Emitter, nodes: dict[str, fx.Node], plan: UniformPlan, v: fx.Node, x_q: fx.Node
) -> fx.Node:
    """The output (batch, queries, width) of heads with zero queries whose values, all heads
    side by side, are ``v`` (batch, keys, width): their masked (or running) mean."""
    w = None
    for name in plan.keys:
        factor = nodes[name]
        w = factor if w is None else emit.call(aten.logical_and.default, w, factor)
    if w is not None:  # (batch or 1, 1, 1, keys) -> (batch or 1, keys, 1) in v's dtype
        w = emit.call(aten.flatten.using_ints, w, 1, -1)
        w = emit.call(aten.type_as.default, emit.call(aten.unsqueeze.default, w, -1), v)
    name = f"{emit.block}_query_less_mean"
    if plan.causal:
        if w is None:
            num = emit.call(aten.cumsum.default, v, 1)
            ones = emit.call(aten.ones_like.default, emit.call(aten.slice.Tensor, v, -1, 0, 1))
            den = emit.call(aten.cumsum.default, ones, 1)
        else:
            num = emit.call(aten.cumsum.default, emit.call(aten.mul.Tensor, w, v), 1)
            den = emit.call(aten.cumsum.default, w, 1)
    elif w is None:  # one mean for every query
        mean = emit.call(aten.mean.dim, v, [1], True)
        return _named(emit, name, aten.expand.default, mean, _rows(emit, x_q))
    else:
        num = emit.call(aten.matmul.default, emit.call(aten.transpose.int, w, 1, 2), v)
        den = emit.call(aten.sum.dim_IntList, w, [1], True)
    ctx = emit.call(aten.div.Tensor, num, den)
    if w is not None and plan.empty != "nan":  # queries that no key is let through
        seen = emit.call(aten.gt.Scalar, den, 0)
        if plan.empty == "zero":
            ctx = emit.call(aten.where.ScalarOther, seen, ctx, 0.0)
        else:
            mean = emit.call(aten.mean.dim, v, [1], True)
            ctx = emit.call(aten.where.self, seen, ctx, mean)
    if plan.causal:
        return _named(emit, name, aten.alias.default, ctx)
    return _named(emit, name, aten.expand.default, ctx, _rows(emit, x_q))


def _rows(emit: Emitter, x_q: fx.Node) -> list:
    """Sizes that expand one row per sequence to ``x_q``'s (batch, queries)."""
    return [emit.call(aten.sym_size.int, x_q, i) for i in range(2)] + [-1]


def _named(emit: Emitter, name: str, op: object, *args: fx.node.Argument) -> fx.Node:
    """``op(*args)`` as a node named ``name``, so the compact graph shows these heads."""
    with emit.graph.inserting_before(emit.anchor):
        return emit.graph.call_function(op, args, name=name)  # type: ignore[arg-type]
