"""Score chains of eager attention: what sits between ``q @ k^T``, the softmax and ``@ v``.

Model code varies here: a scale on the scores or none, additive masks, ``where`` /
``masked_fill`` masks, float32 casts around the softmax, soft-capping (Gemma 2's
``tanh(s / c) * c``), a mask applied again after the softmax. Any elementwise op is accepted:
the rewrite replays the model's own chain on each bucket of heads, slicing inputs that hold
one entry per head. A chain of scales, additive biases and casts only is *canonical*: the
rewrite then runs one ``scaled_dot_product_attention`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from passes.discover.common import scaling
from passes.errors import UnsupportedArchitectureError
from passes.graph import (
    ADD_OPS,
    PASSTHROUGH_OPS,
    arg_node,
    as_node,
    aten,
    is_op,
    live_users,
    module_label,
)

MATMUL = {aten.matmul.default, aten.bmm.default}
#: Elementwise ops that the pointwise tag misses.
_ELEMENTWISE = PASSTHROUGH_OPS | {aten.masked_fill.Tensor}
_LOOKBACK = 8


@dataclass(frozen=True)
class ScoreChain:
    """The ops from the score matmul to the context matmul of one eager attention.

    ``ops`` holds the nodes after ``matmul`` up to the probabilities read by ``context``, in
    graph order, the softmax among them. ``canonical`` chains only scale, add biases (after
    the scaling) and cast: ``scale`` and ``biases`` then describe them completely.
    """

    matmul: fx.Node
    context: fx.Node
    ops: tuple[fx.Node, ...]
    canonical: bool
    scale: float
    biases: tuple[str, ...]


def elementwise(node: fx.Node) -> bool:
    """True for an elementwise op (pointwise, a cast, dropout, masked_fill)."""
    return node.op == "call_function" and (
        node.target in _ELEMENTWISE
        or (
            isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags
        )
    )


def _leads_to_matmul(node: fx.Node, steps: int = _LOOKBACK) -> bool:
    """True when ``node`` is a matmul or computed from one by elementwise ops."""
    if is_op(node, MATMUL):
        return True
    if steps == 0 or not elementwise(node):
        return False
    return any(_leads_to_matmul(a, steps - 1) for a in node.all_input_nodes)


def _refuse_non_elementwise(node: fx.Node) -> None:
    """Raise when a matmul lies a few steps behind ``node``, a non-elementwise op on the way
    (a reshape of the scores to another head layout, a reduction)."""
    frontier = [node]
    for _ in range(_LOOKBACK):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        if any(_leads_to_matmul(a, 0) for a in frontier):
            raise UnsupportedArchitectureError(
                f"attention scores at {module_label(node)} pass through {node.target}, which is "
                f"not elementwise, between the q.k matmul and the softmax; grainfx replays "
                f"elementwise ops there (scales, masks, casts, soft-capping)"
            )


def _before_softmax(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The score matmul behind ``softmax`` and the ops between them (softmax last)."""
    cur, ops = arg_node(softmax, 0), [softmax]
    while not is_op(cur, MATMUL):
        if not elementwise(cur):
            _refuse_non_elementwise(cur)
            return None
        leading = [a for a in cur.all_input_nodes if _leads_to_matmul(a)]
        if not leading:
            return None
        if len(leading) > 1:
            raise UnsupportedArchitectureError(
                f"attention scores at {module_label(cur)} are combined with themselves "
                f"({cur.target}); grainfx replays chains where each op reads the scores once"
            )
        ops.append(cur)
        cur = leading[0]
    return cur, ops[::-1]


def _after_softmax(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The context matmul that reads the probabilities and the ops on the way."""
    cur = softmax
    ops: list[fx.Node] = []
    while True:
        users = live_users(cur)
        if len(users) != 1:
            return None
        user = users[0]
        if is_op(user, MATMUL):
            return (user, ops) if user.args[0] is cur else None
        if not elementwise(user):
            return None
        ops.append(user)
        cur = user


def _canonical(matmul: fx.Node, ops: list[fx.Node]) -> tuple[float, tuple[str, ...]] | None:
    """(scale, additive biases) when ``ops`` (matmul to softmax input) only scale, then add
    biases, and cast; else None."""
    scale, prev = 1.0, matmul
    biases: list[str] = []
    for node in ops:
        at = next((i for i, a in enumerate(node.args) if a is prev), None)
        if at is None:
            return None
        factor = scaling(node) if at == 0 else None
        if is_op(node, PASSTHROUGH_OPS):
            pass
        elif factor is not None and not biases:
            scale *= factor
        elif is_op(node, ADD_OPS) and isinstance(node.args[1 - at], fx.Node):
            biases.append(as_node(node.args[1 - at]).name)
        else:
            return None
        prev = node
    return scale, tuple(biases)


def score_chain(softmax: fx.Node) -> ScoreChain | None:
    """The score chain around ``softmax``, or None when this softmax is not attention's.

    Raises UnsupportedArchitectureError when the scores pass through an op that is not
    elementwise, or are combined with themselves.
    """
    before = _before_softmax(softmax)
    if before is None:
        return None
    after = _after_softmax(softmax)
    if after is None:
        return None
    (matmul, pre), (context, post) = before, after
    ops = pre + post
    canonical = (
        _canonical(matmul, pre[:-1]) if all(is_op(n, PASSTHROUGH_OPS) for n in post) else None
    )
    scale, biases = canonical if canonical is not None else (1.0, ())
    return ScoreChain(matmul, context, tuple(ops), canonical is not None, scale, biases)


def score_source(softmax: fx.Node) -> fx.Node:
    """The first op behind ``softmax`` that is not elementwise (following first arguments):
    what a softmax that is not attention's computes its input from, for messages."""
    cur = arg_node(softmax, 0)
    while elementwise(cur) and cur.all_input_nodes:
        cur = cur.all_input_nodes[0]
    return cur
