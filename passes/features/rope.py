"""Rotary position embeddings (RoPE) of queries and keys: recognizer, units and emission.

Discover matches ``x * cos + rotate(x) * sin`` with ``rotate`` either rotate-half
(``cat([-x[..., r/2:], x[..., :r/2]])``, Llama and most models) or interleaved
(``flatten(stack([-x[..., 1::2], x[..., ::2]], -1))``, GPT-J), and partial rotary
``cat([rope(x[..., :r]), x[..., r:]])`` (GPT-NeoX, Phi). Casts around the operand are looked
through (ModernBERT rotates in float32).

Units: a query unit is a rotary pair of dims (pass-through dims of partial rotary are units
one by one). Rewrite: the kept rotary pairs keep their pairing in the compact layout
(rotate-half: all first halves, then all second halves; interleaved: pair by pair) and the
cos/sin tables are gathered to match, so positions stay exact at every length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from torch import fx

from passes.discover.common import dim_slice, last_dim, strip
from passes.errors import UnsupportedArchitectureError
from passes.features import AttentionFeature, OperandRecognizer, Traced
from passes.graph import arg_node, arg_nodes, aten, is_op, module_label, shape, static
from passes.rewrite.emit import PAD

if TYPE_CHECKING:
    from passes.rewrite.attention import Bucket
    from passes.rewrite.emit import Emitter
    from passes.structure import AttentionBlock


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding applied to a query or key operand.

    ``layout`` is ``"half"`` (dims i and i + r/2 rotate together) or ``"interleaved"`` (dims
    2i and 2i + 1, GPT-J); the first ``rotary_dims`` dims of a head rotate, the rest pass
    through. ``cos`` and ``sin`` name the tables multiplied in; they broadcast over heads along
    ``head_axis`` (size 1 there) and hold ``rotary_dims`` entries last.
    """

    layout: str
    rotary_dims: int
    cos: str
    sin: str
    head_axis: int

    def pair_dims(self, pair: int) -> tuple[int, int]:
        """The two head dims that rotary pair ``pair`` rotates together."""
        if self.layout == "half":
            return pair, pair + self.rotary_dims // 2
        return 2 * pair, 2 * pair + 1


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


def _match(node: fx.Node, role: str, heads: int, head_dim: int) -> tuple[Rope, fx.Node] | None:
    return match_rope(node)


#: RoPE on the queries and keys, matched before layout ops (a partial rotary's ``cat``).
OPERAND = OperandRecognizer("rope", frozenset({"query", "key"}), True, _match)


@dataclass(frozen=True)
class Rotary(AttentionFeature):
    """Rotary positions of a block's queries (``q``) and keys (``k``): one layout and
    number of rotary dims, each with its own tables."""

    q: Rope
    k: Rope

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> Rotary | None:
        q, k = traced.query.found.get("rope"), traced.key.found.get("rope")
        if q is None and k is None:
            return None
        if q is None or k is None or (q.layout, q.rotary_dims) != (k.layout, k.rotary_dims):
            raise UnsupportedArchitectureError(
                f"attention at {module_label(traced.where)} rotates queries and keys "
                f"differently ({q} vs {k}); grainfx needs the same rotary layout on both"
            )
        return cls(q, k)

    def rotary_dims(self) -> int:
        return self.q.rotary_dims

    def pair_dims(self, pair: int) -> tuple[int, int]:
        return self.q.pair_dims(pair)

    def compact_pairs(self, pairs: tuple[int, ...], width: int) -> list[int]:
        pad = [PAD] * (width - len(pairs))
        if self.q.layout == "half":
            return (
                [self.pair_dims(p)[0] for p in pairs]
                + pad
                + [self.pair_dims(p)[1] for p in pairs]
                + pad
            )
        return [d for p in pairs for d in self.pair_dims(p)] + pad * 2

    def note(self, block: AttentionBlock) -> str | None:
        if not block.has_query_units:
            return None
        rope = self.q
        partial = (
            f", {block.head_dim - rope.rotary_dims} pass-through dims"
            if rope.rotary_dims < block.head_dim
            else ""
        )
        return (
            f"RoPE ({rope.layout}): query units are {rope.rotary_dims // 2} rotary pairs{partial}"
        )

    def expand_query_mask(self, graph: fx.Graph, mask: fx.Node, block: AttentionBlock) -> fx.Node:
        pairs = self.rotary_dims() // 2
        if not pairs:
            return mask
        rotary = graph.call_function(aten.slice.Tensor, (mask, 1, 0, pairs))
        passing = graph.call_function(aten.slice.Tensor, (mask, 1, pairs, block.head_dim))
        if self.q.layout == "half":
            parts = [rotary, rotary, passing]
        else:
            parts = [graph.call_function(aten.repeat_interleave.self_int, (rotary, 2, 1)), passing]
        return graph.call_function(aten.cat.default, (parts, 1))

    def emit_qk(
        self, emit: Emitter, nodes: Mapping[str, fx.Node], bucket: Bucket, q: fx.Node, k: fx.Node
    ) -> tuple[fx.Node, fx.Node]:
        wp = bucket.wp
        if not wp:
            return q, k
        q_table = [i for lay in bucket.q_layouts for i in self._table(lay.pairs, wp)]
        k_table = [i for lay in bucket.k_layouts for i in self._table(lay.pairs, wp)]
        q = _rotate(emit, nodes, self.q, q, q_table, wp, bucket.width)
        k = _rotate(emit, nodes, self.k, k, k_table, wp, bucket.width)
        return q, k

    def _table(self, pairs: tuple[int, ...], wp: int) -> list[int]:
        """Entries of the cos/sin tables for the rotary part of a head (0 at PAD)."""
        return [0 if d == PAD else d for d in self.compact_pairs(pairs, wp)]


def _rotate(
    emit: Emitter,
    nodes: Mapping[str, fx.Node],
    rope: Rope,
    x: fx.Node,
    table_index: list[int],
    wp: int,
    width: int,
) -> fx.Node:
    """Rotary embedding of the first ``2 wp`` dims of ``x`` (batch, heads, seq, width) with
    the model's cos/sin tables gathered at ``table_index`` (heads x 2 wp entries)."""
    heads = len(table_index) // (2 * wp)
    index = emit.tensor(f"rope_{x.name}", torch.tensor(table_index), False)

    def table(name: str) -> fx.Node:
        t = emit.call(aten.squeeze.dim, nodes[name], rope.head_axis)  # (batch?, seq, rotary)
        t = emit.call(aten.index_select.default, t, -1, index)
        t = emit.call(aten.unflatten.int, t, -1, [heads, 2 * wp])
        return emit.call(aten.transpose.int, t, 1, 2)

    rot = emit.call(aten.slice.Tensor, x, -1, 0, 2 * wp) if width != 2 * wp else x
    if rope.layout == "half":
        turned = emit.call(
            aten.cat.default,
            [
                emit.call(aten.neg.default, emit.call(aten.slice.Tensor, rot, -1, wp, 2 * wp)),
                emit.call(aten.slice.Tensor, rot, -1, 0, wp),
            ],
            -1,
        )
    else:
        stacked = emit.call(
            aten.stack.default,
            [
                emit.call(aten.neg.default, emit.call(aten.slice.Tensor, rot, -1, 1, 2 * wp, 2)),
                emit.call(aten.slice.Tensor, rot, -1, 0, 2 * wp, 2),
            ],
            -1,
        )
        turned = emit.call(aten.flatten.using_ints, stacked, -2, -1)
    out = emit.call(
        aten.add.Tensor,
        emit.call(aten.mul.Tensor, rot, table(rope.cos)),
        emit.call(aten.mul.Tensor, turned, table(rope.sin)),
    )
    if width == 2 * wp:
        return out
    rest = emit.call(aten.slice.Tensor, x, -1, 2 * wp, width)
    return emit.call(aten.cat.default, [out, rest], -1)
