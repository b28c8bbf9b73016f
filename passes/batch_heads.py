"""Lift attention computed in a (batch * heads) layout to the (batch, heads) layout.

Some models merge the batch and head dims of q, k and v (``reshape(x, [B * H, S, d])``) and
compute scores and context as batched 3-d products (``bmm``, ``baddbmm``), viewing the scores
as (B, H, S, S) only around the softmax (BLOOM). Discover and rewrite follow attention in the
(batch, heads, seq, head size) layout, so capture rewrites each such product back into it: a
3-d product whose result is viewed as (B, H, ...) is replaced by the 4-d product of its
operands before their merge; ``baddbmm(c, a, b, beta, alpha)`` becomes
``alpha * (a @ b) + beta * c``, with ``c`` unflattened to (B, H, ...) when it has one entry per
(batch, head) pair (BLOOM's ALiBi bias), so that per-head inputs stay visible as such.

Preserves computation: yes (the same products and sums, in another layout).
"""

from __future__ import annotations

from typing import Any, Callable, cast

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from passes.graph import arg_node, aten, is_impure, is_op, shape, static

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_PRODUCTS = {aten.bmm.default, aten.baddbmm.default}


def _same(a: tuple, b: tuple) -> bool:
    """True when the (possibly symbolic) sizes ``a`` and ``b`` are provably equal."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


class _Lifter:
    """Emits the 4-d form of 3-d tensors of ``heads`` merged heads, before ``anchor``."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, heads: int):
        self.graph, self.anchor, self.heads = graph, anchor, heads

    def call(self, op: Callable[..., Any], *args: Any) -> fx.Node:
        """A new node ``op(*args)`` with its shape recorded (discover reads shapes)."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(op, args)
        values = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
        node.meta["val"] = op(*values)
        return node

    def merged(self, node: fx.Node) -> fx.Node | None:
        """The (B, H, S, d) tensor that ``node`` merges to (B * H, S, d), else None."""
        if not is_op(node, _VIEWS):
            return None
        source = arg_node(node, 0)
        before, after = shape(source), shape(node)
        if before is None or after is None or len(before) != 4 or len(after) != 3:
            return None
        if static(before[1]) != self.heads or not _same(before[2:], after[1:]):
            return None
        return source

    def operand(self, node: fx.Node) -> tuple[fx.Node, bool] | None:
        """A product operand as (the 4-d tensor it merges, transposed?), else None."""
        found = self.merged(node)
        if found is not None:
            return found, False
        dims = node.args[1:3]
        if is_op(node, [aten.transpose.int]) and {int(cast(int, d)) % 3 for d in dims} == {1, 2}:
            inner = self.merged(arg_node(node, 0))
            if inner is not None:
                return inner, True
        return None

    def addend(self, node: fx.Node, merged: object) -> fx.Node:
        """The 4-d form of a 3-d tensor added to the products: unflattened where it has
        ``merged`` (B * H) entries along dim 0, else it broadcasts as it is."""
        dims = shape(node)
        if dims is not None and len(dims) == 3 and _same((dims[0],), (merged,)):
            return self.call(aten.unflatten.int, node, 0, [-1, self.heads])
        return node

    def product(self, node: fx.Node) -> fx.Node | None:
        """The 4-d form of ``bmm`` / ``baddbmm`` ``node``, or None where an operand is not a
        head merge."""
        base = 1 if is_op(node, [aten.baddbmm.default]) else 0
        found = [self.operand(arg_node(node, base + i)) for i in range(2)]
        if found[0] is None or found[1] is None:
            return None
        a, b = (
            self.call(aten.transpose.int, x, -1, -2) if transposed else x
            for x, transposed in (found[0], found[1])
        )
        out = self.call(aten.matmul.default, a, b)
        if base == 0:
            return out
        alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
        if alpha != 1:
            out = self.call(aten.mul.Tensor, out, alpha)
        dims = shape(node)
        assert dims is not None  # export records the shape of every tensor node
        bias = self.addend(arg_node(node, 0), dims[0])
        if beta != 1:
            bias = self.call(aten.mul.Tensor, bias, beta)
        return self.call(aten.add.Tensor, out, bias)


def _split_heads(view: fx.Node) -> int | None:
    """Heads H when ``view`` turns a 3-d product (B * H, S, T) into (B, H, S, T), else None."""
    if not is_op(view, _VIEWS) or not is_op(arg_node(view, 0), _PRODUCTS):
        return None
    before, after = shape(arg_node(view, 0)), shape(view)
    if before is None or after is None or len(before) != 3 or len(after) != 4:
        return None
    if static(after[1]) is None or not _same(before[1:], after[2:]):
        return None
    return int(after[1])


def lift_batch_heads(gm: fx.GraphModule) -> bool:
    """Rewrite the (batch * heads) products of ``gm`` in place into (batch, heads) ones.

    Returns True when the graph changed. The 3-d products and the merges that only they read
    are removed; nothing else is.
    """
    changed = False
    for view in list(gm.graph.nodes):
        heads = _split_heads(view)
        if heads is None:
            continue
        lifted = _Lifter(gm.graph, view, heads).product(arg_node(view, 0))
        if lifted is not None:
            view.replace_all_uses_with(lifted)
            _erase_dead(gm.graph, view)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and, recursively, the computed inputs that nothing else reads; metadata
    asserts on them go too."""
    stack, erased = [node], set()
    while stack:
        cur = stack.pop()
        if cur.op != "call_function" or cur in erased:
            continue
        asserts = [u for u in cur.users if u.target is aten._assert_tensor_metadata.default]
        if len(cur.users) != len(asserts) or is_impure(cur):
            continue
        for user in asserts:
            graph.erase_node(user)
        inputs = cur.all_input_nodes
        graph.erase_node(cur)
        erased.add(cur)
        stack.extend(inputs)
