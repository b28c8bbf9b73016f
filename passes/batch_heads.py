"""Lift attention computed in a (batch * heads) layout to the (batch, heads) layout.

Some models merge the batch and head dims of q, k and v (``reshape(x, [B * H, S, d])``) and
compute scores and context as batched 3-d products (``bmm``, ``baddbmm``), viewing the scores
as (B, H, S, S) only around the softmax (BLOOM, DeBERTa). Discover and rewrite follow
attention in the (batch, heads, seq, head size) layout, so capture rewrites such scores back
into it: a 3-d tensor viewed as (B, H, ...) that is computed from head merges by products,
transposes, gathers along the last dim and elementwise ops is replaced by the same ops on the
4-d tensors before the merge.

* ``baddbmm(c, a, b, beta, alpha)`` becomes ``alpha * (a @ b) + beta * c``, with ``c``
  unflattened to (B, H, ...) when it has one entry per (batch, head) pair (BLOOM's ALiBi
  bias), so that per-head inputs stay visible as such.
* A head merge of batch 1 repeated over the batch (DeBERTa's projected relative position
  embeddings) broadcasts as (1, H, ...); a gather index expanded from batch 1 is expanded to
  (B, H, ...).
* A scale of an operand (``k^T / c``) is applied before its transpose.

Preserves computation: yes (the same products and sums, in another layout).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, cast

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from passes.graph import arg_node, as_node, aten, is_impure, is_op, shape, static

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_PRODUCTS = {aten.bmm.default, aten.baddbmm.default}


def _same(a: tuple, b: tuple) -> bool:
    """True when the (possibly symbolic) sizes ``a`` and ``b`` are provably equal."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


def _pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and (
        torch.Tag.pointwise in node.target.tags
    )


class _Lifter:
    """Emits the 4-d form of 3-d tensors of ``heads`` merged heads, before ``anchor``;
    ``merged`` is the (batch * heads) size of their dim 0."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, heads: int, merged: object):
        self.graph, self.anchor, self.heads, self.size = graph, anchor, heads, merged
        self.created: list[fx.Node] = []

    def call(self, op: Callable[..., Any], *args: Any) -> fx.Node:
        """A new node ``op(*args)`` with its shape recorded (discover reads shapes)."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(op, args)
        self.created.append(node)
        values = fx.node.map_arg(args, lambda a: a.meta["val"])
        node.meta["val"] = op(*values)
        return node

    def undo(self) -> None:
        """Erase the nodes emitted so far (the lift failed)."""
        for node in reversed(self.created):
            self.graph.erase_node(node)
        self.created.clear()

    def _leading(self, node: fx.node.Argument) -> bool:
        """True for a 3-d tensor with (batch * heads) entries along dim 0."""
        dims = shape(node) if isinstance(node, fx.Node) else None
        return dims is not None and len(dims) == 3 and _same((dims[0],), (self.size,))

    def merged(self, node: fx.Node) -> fx.Node | None:
        """The (B, H, S, d) tensor that ``node`` merges to (B * H, S, d) (B may be 1 where
        ``node`` is then repeated over the batch), else None."""
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
        """A product operand as (its 4-d form before any transpose, transposed?), else None.

        Recognized: a head merge; a head merge of batch 1 repeated over the batch (DeBERTa's
        relative position embeddings), which broadcasts as it is; a transpose of the last two
        dims; an elementwise op with 0-d other operands (a scale), which commutes with the
        transpose."""
        found = self.merged(node)
        if found is not None:
            return found, False
        if is_op(node, [aten.repeat.default]):
            source = self.merged(arg_node(node, 0))
            dims = shape(source) if source is not None else None
            if source is not None and dims is not None and dims[0] == 1:
                return source, False
            return None
        if is_op(node, [aten.transpose.int]):
            if {int(cast(int, d)) % 3 for d in node.args[1:3]} != {1, 2}:
                return None
            inner = self.operand(arg_node(node, 0))
            return None if inner is None else (inner[0], not inner[1])
        if _pointwise(node) and node.args and isinstance(node.args[0], fx.Node):
            others = [a for a in node.all_input_nodes if a is not node.args[0]]
            if any(shape(a) != () for a in others):
                return None
            inner = self.operand(node.args[0])
            if inner is None:
                return None
            lifted = self.call(cast(Callable[..., Any], node.target), inner[0], *node.args[1:])
            return lifted, inner[1]
        return None

    def lift(self, node: fx.Node) -> fx.Node | None:
        """The 4-d form of ``node``, (batch * heads, ...) scores computed from head merges by
        products, transposes, gathers along the last dim and elementwise ops; else None."""
        if is_op(node, _PRODUCTS):
            return self.product(node)
        if is_op(node, [aten.transpose.int]):
            if {int(cast(int, d)) % 3 for d in node.args[1:3]} != {1, 2}:
                return None
            inner = self.lift(arg_node(node, 0))
            return None if inner is None else self.call(aten.transpose.int, inner, -1, -2)
        if is_op(node, [aten.gather.default]) and int(cast(int, node.args[1])) % 3 == 2:
            source = self.lift(arg_node(node, 0))
            if source is None:
                return None
            index = self.index(arg_node(node, 2))
            return None if index is None else self.call(aten.gather.default, source, -1, index)
        if _pointwise(node) and not node.kwargs:
            leading = [a for a in node.args if self._leading(a)]
            if not leading:
                return None
            lifted: dict[fx.Node, fx.Node] = {}
            for arg in leading:
                found = self.lift(as_node(arg))
                if found is None:
                    return None
                lifted[as_node(arg)] = found
            args = fx.node.map_arg(node.args, lambda a: lifted.get(a, a))
            return self.call(cast(Callable[..., Any], node.target), *args)
        return None

    def index(self, node: fx.Node) -> fx.Node | None:
        """The 4-d form of a gather index: an expand of a tensor of batch 1 to (batch *
        heads, ...) is expanded to (batch, heads, ...) instead."""
        sizes = node.args[1] if is_op(node, [aten.expand.default]) else None
        if isinstance(sizes, (list, tuple)) and len(sizes) == 3:
            inner = arg_node(node, 0)
            dims = shape(inner)
            if dims is not None and len(dims) == 3 and dims[0] == 1:
                merged = sizes[0]  # batch * heads: the batch from it, not from the scores
                batch = (
                    merged // self.heads
                    if isinstance(merged, int)
                    else self.call(operator.floordiv, merged, self.heads)
                )
                return self.call(
                    aten.expand.default,
                    self.call(aten.unsqueeze.default, inner, 0),
                    [batch, self.heads, -1, -1],
                )
        if self._leading(node):
            return self.call(aten.unflatten.int, node, 0, [-1, self.heads])
        return None

    def addend(self, node: fx.Node) -> fx.Node:
        """The 4-d form of a 3-d tensor added to the products: unflattened where it has
        (batch * heads) entries along dim 0, else it broadcasts as it is."""
        if self._leading(node):
            return self.call(aten.unflatten.int, node, 0, [-1, self.heads])
        return node

    def product(self, node: fx.Node) -> fx.Node | None:
        """The 4-d form of ``bmm`` / ``baddbmm`` ``node``, or None where an operand is not a
        head merge."""
        base = 1 if is_op(node, [aten.baddbmm.default]) else 0
        operands = []
        for i in range(2):
            found = self.operand(arg_node(node, base + i))
            if found is None:
                return None
            x, transposed = found
            operands.append(self.call(aten.transpose.int, x, -1, -2) if transposed else x)
        out = self.call(aten.matmul.default, *operands)
        if base == 0:
            return out
        alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
        if alpha != 1:
            out = self.call(aten.mul.Tensor, out, alpha)
        bias = self.addend(arg_node(node, 0))
        if beta != 1:
            bias = self.call(aten.mul.Tensor, bias, beta)
        return self.call(aten.add.Tensor, out, bias)


def _split_heads(view: fx.Node) -> tuple[int, object] | None:
    """(heads H, B * H) when ``view`` turns a 3-d tensor (B * H, S, T) into (B, H, S, T)."""
    if not is_op(view, _VIEWS):
        return None
    before, after = shape(arg_node(view, 0)), shape(view)
    if before is None or after is None or len(before) != 3 or len(after) != 4:
        return None
    if static(after[1]) is None or not _same(before[1:], after[2:]):
        return None
    return int(after[1]), before[0]


def lift_batch_heads(gm: fx.GraphModule) -> bool:
    """Rewrite the (batch * heads) products of ``gm`` in place into (batch, heads) ones.

    Returns True when the graph changed. The 3-d products and the merges that only they read
    are removed; nothing else is.
    """
    changed = False
    for view in list(gm.graph.nodes):
        split = _split_heads(view)
        if split is None:
            continue
        lifter = _Lifter(gm.graph, view, *split)
        lifted = lifter.lift(arg_node(view, 0))
        if lifted is None:
            lifter.undo()
        else:
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
