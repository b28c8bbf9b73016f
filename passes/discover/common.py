"""Small matchers shared by discover's recognizers: constants, scales, casts, no-op slices."""

from __future__ import annotations

from typing import Any, overload

import torch
from torch import fx

from passes.graph import CAST_OPS, arg_node, aten, attr_tensor, is_op, shape, static

#: ``slice(x, dim, 0, end)`` with this end (or larger) reaches the end of ``dim``.
_END = 2**62


def scalar(value: fx.node.Argument) -> float | None:
    """A Python number, or a constant 0-dim ``aten.full`` node, as a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and is_op(value, [aten.full.default]) and value.args[0] == []:
        return float(value.args[1])  # type: ignore[arg-type]  # full's fill value: a number
    constant = _constant_scalar(value, _DEPTH) if isinstance(value, fx.Node) else None
    return None if constant is None else float(constant)


_DEPTH = 8


def _constant_scalar(node: fx.Node, depth: int) -> torch.Tensor | None:
    """The value of a 0-dim tensor computed from constant tensors (not parameters) alone in
    a few ops, as DeBERTa's ``sqrt(tensor(head_size) * 3)``; else None."""
    if depth == 0 or shape(node) != ():
        return None
    gm = node.graph.owning_module
    if node.op == "get_attr" and gm is not None:
        value = attr_tensor(gm, node)
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
            return None
        return value.detach().clone()
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    values = {a: _constant_scalar(a, depth - 1) for a in node.all_input_nodes}
    if any(v is None for v in values.values()):
        return None
    result = node.target(*fx.node.map_arg(node.args, values.get), **node.kwargs)
    return result if isinstance(result, torch.Tensor) and result.dim() == 0 else None


def scaling(node: fx.Node) -> float | None:
    """The constant factor of ``x * c`` or ``x / c``, else None."""
    if is_op(node, [aten.mul.Tensor, aten.mul.Scalar]):
        return scalar(node.args[1])
    if is_op(node, [aten.div.Tensor, aten.div.Scalar]):
        divisor = scalar(node.args[1])
        return None if divisor is None else 1.0 / divisor
    return None


def is_noop_slice(node: fx.Node) -> bool:
    """``slice(x, dim, 0, end)`` that keeps all of ``dim`` (export emits these around
    indexing like ``x[:, :, None]``)."""
    if not is_op(node, [aten.slice.Tensor]):
        return False
    args: list[Any] = list(node.args) + [None] * (5 - len(node.args))
    start, stop, step = args[2] or 0, args[3], args[4] or 1
    if start != 0 or step != 1:
        return False
    src = shape(arg_node(node, 0))
    dim = args[1] or 0
    size = static(src[dim]) if src is not None else None
    return isinstance(stop, int) and (stop >= _END or (size is not None and stop >= size))


@overload
def strip(node: fx.Node) -> fx.Node: ...
@overload
def strip(node: fx.node.Argument) -> fx.node.Argument: ...
def strip(node: fx.node.Argument) -> fx.node.Argument:
    """``node`` without the casts, aliases and no-op slices in front of it."""
    while isinstance(node, fx.Node) and (is_op(node, CAST_OPS) or is_noop_slice(node)):
        node = arg_node(node, 0)
    return node


def last_dim(node: fx.Node, dim: object) -> bool:
    """True when ``dim`` is the last dimension of ``node``'s result."""
    dims = shape(node)
    return dims is not None and isinstance(dim, int) and dim % len(dims) == len(dims) - 1


def dim_slice(node: fx.Node) -> tuple[fx.Node, int, int | None, int] | None:
    """For a slice of the last dim: (source, start, stop or None for the end, step)."""
    if not is_op(node, [aten.slice.Tensor]):
        return None
    args: list[Any] = list(node.args) + [None] * (5 - len(node.args))
    src = args[0]
    if not last_dim(src, args[1] if args[1] is not None else 0):
        return None
    dims = shape(src)
    assert dims is not None  # last_dim read it
    total = static(dims[-1])
    stop = args[3]
    if stop is None or (isinstance(stop, int) and total is not None and stop >= total):
        stop = None
    return src, args[2] or 0, stop, args[4] or 1
