"""Small matchers shared by discover's recognizers: constants, casts, no-op slices."""

from __future__ import annotations

from torch import fx

from passes.graph import CAST_OPS, aten, is_op, shape, static

#: ``slice(x, dim, 0, end)`` with this end (or larger) reaches the end of ``dim``.
_END = 2 ** 62


def scalar(value) -> float | None:
    """A Python number, or a constant 0-dim ``aten.full`` node, as a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and is_op(value, [aten.full.default]) and value.args[0] == []:
        return float(value.args[1])
    return None


def is_noop_slice(node: fx.Node) -> bool:
    """``slice(x, dim, 0, end)`` that keeps all of ``dim`` (export emits these around
    indexing like ``x[:, :, None]``)."""
    if not is_op(node, [aten.slice.Tensor]):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    start, stop, step = args[2] or 0, args[3], args[4] or 1
    if start != 0 or step != 1:
        return False
    src = shape(node.args[0])
    dim = args[1] or 0
    size = static(src[dim]) if src is not None else None
    return isinstance(stop, int) and (stop >= _END or (size is not None and stop >= size))


def strip(node):
    """``node`` without the casts, aliases and no-op slices in front of it."""
    while isinstance(node, fx.Node) and (is_op(node, CAST_OPS) or is_noop_slice(node)):
        node = node.args[0]
    return node


def last_dim(node: fx.Node, dim) -> bool:
    """True when ``dim`` is the last dimension of ``node``'s result."""
    dims = shape(node)
    return dims is not None and isinstance(dim, int) and dim % len(dims) == len(dims) - 1


def dim_slice(node: fx.Node) -> tuple[fx.Node, int, int | None, int] | None:
    """For a slice of the last dim: (source, start, stop or None for the end, step)."""
    if not is_op(node, [aten.slice.Tensor]):
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    src = args[0]
    if not last_dim(src, args[1] if args[1] is not None else 0):
        return None
    total = static(shape(src)[-1])
    stop = args[3]
    if stop is None or (isinstance(stop, int) and total is not None and stop >= total):
        stop = None
    return src, args[2] or 0, stop, args[4] or 1
