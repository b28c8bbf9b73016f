"""Recognizer of key/value heads shared by several query heads (GQA/MQA).

Matches Hugging Face's ``repeat_kv``: ``reshape(expand(x[:, :, None], [B, kv, g, S, d]),
[B, kv * g, S, d])``, and ``repeat_interleave(x, g, dim=1)``.
"""

from __future__ import annotations

from torch import fx

from passes.discover.common import strip
from passes.graph import arg_node, aten, is_op, shape, static


def match_kv_repeat(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(x, kv heads)`` when ``node`` repeats the heads (dim 1) of ``x``; else None."""
    if is_op(node, [aten.reshape.default, aten.view.default, aten._unsafe_view.default]):
        expand = strip(arg_node(node, 0))
        if not is_op(expand, [aten.expand.default]):
            return None
        unsqueeze = strip(arg_node(expand, 0))
        if not is_op(unsqueeze, [aten.unsqueeze.default]) or unsqueeze.args[1] != 2:
            return None
        x = strip(arg_node(unsqueeze, 0))
    elif is_op(node, [aten.repeat_interleave.self_int]):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim != 1:
            return None
        x = strip(arg_node(node, 0))
    else:
        return None
    dims = shape(x)
    if dims is None or len(dims) != 4 or static(dims[1]) is None:
        return None
    return x, int(dims[1])
