"""Recognizer of norms over the last dim: a norm over query/key head dims (Qwen3, Gemma 3;
the feature :mod:`passes.features.head_norm`) between projection and scores, and the pre-norm
that feeds a block from the residual stream.

A norm region is made of casts, powers, means / variances over the last dim, elementwise
arithmetic with constants or parameters, ``rsqrt``/``sqrt`` and fused norm ops, and reads one
tensor (its source) besides parameters.
"""

from __future__ import annotations

import operator

from torch import fx

from passes.discover.common import last_dim, scalar, strip
from passes.graph import CAST_OPS, NORM_OPS, arg_node, aten, is_op

_REDUCE = {aten.mean.dim, aten.var.correction, aten.var.dim} | NORM_OPS
_ELEMENTWISE = {
    aten.pow.Tensor_Scalar,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.sub.Tensor,
    aten.add.Tensor,
    aten.add.Scalar,
}


def is_param(node: fx.node.Argument) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _inside(node: fx.Node) -> bool:
    if is_op(node, [aten.add.Tensor]):
        # x + y of two computed tensors is a residual add, not part of a norm
        return any(is_param(a) or scalar(a) is not None for a in node.args[:2])
    if is_op(node, CAST_OPS | _ELEMENTWISE):
        return True
    if is_op(node, _REDUCE):
        if node.target in NORM_OPS:
            return True
        dims = node.args[1] if len(node.args) > 1 else None
        return (
            isinstance(dims, (list, tuple))
            and len(dims) == 1
            and last_dim(arg_node(node, 0), dims[0])
        )
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and is_op(arg_node(node, 0), NORM_OPS)
    )


def norm_region(node: fx.Node, stop: fx.Node | None = None) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(source, region)`` of the norm whose output is ``node``; None when ``node`` is no norm
    over the last dim. ``stop`` ends the walk early (a known source)."""
    region, sources, stack, seen = [], set(), [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur is stop or not _inside(cur):
            sources.add(strip(cur))
            continue
        region.append(cur)
        stack.extend(a for a in cur.all_input_nodes if not is_param(a) and scalar(a) is None)
    if len(sources) != 1 or not any(is_op(n, _REDUCE) for n in region):
        return None
    return sources.pop(), region
