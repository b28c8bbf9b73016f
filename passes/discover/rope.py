"""Recognizer of rotary position embeddings (RoPE) applied to a query or key operand.

Matches ``x * cos + rotate(x) * sin`` with ``rotate`` either rotate-half
(``cat([-x[..., r/2:], x[..., :r/2]])``, Llama and most models) or interleaved
(``flatten(stack([-x[..., 1::2], x[..., ::2]], -1))``, GPT-J), and partial rotary
``cat([rope(x[..., :r]), x[..., r:]])`` (GPT-NeoX, Phi). Casts around the operand are looked
through (ModernBERT rotates in float32).
"""

from __future__ import annotations

from torch import fx

from passes.discover.common import dim_slice, last_dim, strip
from passes.graph import arg_node, arg_nodes, aten, is_op, shape, static
from passes.structure import Rope


def _rotated_half(node: fx.Node) -> fx.Node | None:
    """``x`` for ``cat([-x[..., h:], x[..., :h]], -1)`` with h half of x's last dim."""
    if not is_op(node, [aten.cat.default]) or len(arg_nodes(node, 0)) != 2:
        return None
    if not last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return None
    first, second = arg_nodes(node, 0)
    if not is_op(first, [aten.neg.default]):
        return None
    upper, lower = dim_slice(arg_node(first, 0)), dim_slice(second)
    if upper is None or lower is None or strip(upper[0]) is not strip(lower[0]):
        return None
    dims = shape(upper[0])
    assert dims is not None  # dim_slice read it
    total = static(dims[-1])
    if total is None or total % 2:
        return None
    half = total // 2
    if upper[1:] != (half, None, 1) or lower[1:] != (0, half, 1):
        return None
    return strip(upper[0])


def _rotated_pairs(node: fx.Node) -> fx.Node | None:
    """``x`` for ``flatten(stack([-x[..., 1::2], x[..., ::2]], -1), -2)``."""
    if not is_op(node, [aten.flatten.using_ints, aten.view.default, aten.reshape.default]):
        return None
    stack = arg_node(node, 0)
    if not is_op(stack, [aten.stack.default]) or len(arg_nodes(stack, 0)) != 2:
        return None
    first, second = arg_nodes(stack, 0)
    if not is_op(first, [aten.neg.default]):
        return None
    odd, even = dim_slice(arg_node(first, 0)), dim_slice(second)
    if odd is None or even is None or strip(odd[0]) is not strip(even[0]):
        return None
    if odd[1:] != (1, None, 2) or even[1:] != (0, None, 2):
        return None
    dims, odd_dims = shape(node), shape(odd[0])
    assert odd_dims is not None  # dim_slice read it
    if dims is None or dims[-1] != odd_dims[-1]:
        return None
    return strip(odd[0])


def _rotation(node: fx.Node) -> tuple[str, fx.Node] | None:
    node = strip(node)
    for layout, match in (("half", _rotated_half), ("interleaved", _rotated_pairs)):
        x = match(node)
        if x is not None:
            return layout, x
    return None


def _head_axis(x: fx.Node, table: fx.Node) -> int | None:
    """The axis along which ``table`` (size 1 there) broadcasts over the heads of ``x``."""
    xs, ts = shape(x), shape(table)
    if xs is None or ts is None or len(xs) != 4 or len(ts) != 4:
        return None
    axes = [a for a in (1, 2) if static(ts[a]) == 1 and static(xs[a]) is not None]
    return axes[0] if len(axes) == 1 else None


def _full(node: fx.Node) -> tuple[Rope, fx.Node] | None:
    """``x * cos + rotate(x) * sin`` over all of x's last dim: (rope, x)."""
    if not is_op(node, [aten.add.Tensor]):
        return None
    terms = [strip(a) for a in node.args[:2]]
    muls = [t for t in terms if isinstance(t, fx.Node) and is_op(t, [aten.mul.Tensor])]
    if len(muls) != len(terms):
        return None
    for plain, rotated in (muls, muls[::-1]):
        for a, b in (rotated.args[:2], rotated.args[1::-1]):
            found = _rotation(a) if isinstance(a, fx.Node) else None
            if found is None:
                continue
            layout, x = found
            sin = b
            cos = [c for p, c in (plain.args[:2], plain.args[1::-1]) if strip(p) is x]
            if not cos or not isinstance(sin, fx.Node) or not isinstance(cos[0], fx.Node):
                continue
            axis = _head_axis(x, cos[0])
            if axis is None or _head_axis(x, sin) != axis:
                continue
            x_dims = shape(x)
            dims = static(x_dims[-1]) if x_dims is not None else None
            if dims is None:
                continue
            return Rope(layout, dims, cos[0].name, sin.name, axis), x
    return None


def match_rope(node: fx.Node) -> tuple[Rope, fx.Node] | None:
    """The rotary embedding whose output is ``node``, and the operand it rotates; else None."""
    found = _full(node)
    if found is not None:
        return found
    if not is_op(node, [aten.cat.default]) or len(arg_nodes(node, 0)) != 2:
        return None
    if not last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return None
    rotated, passed = arg_nodes(node, 0)
    found = _full(strip(rotated))
    tail = dim_slice(passed)
    if found is None or tail is None:
        return None
    rope, x_rot = found
    head = dim_slice(x_rot) if is_op(x_rot, [aten.slice.Tensor]) else (x_rot, 0, None, 1)
    if head is None or head[1] != 0 or head[3] != 1 or tail[3] != 1 or tail[2] is not None:
        return None
    source = strip(head[0])
    if strip(tail[0]) is not source or tail[1] != rope.rotary_dims:
        return None
    return rope, source
