"""Key/value heads shared by several query heads (GQA/MQA): recognizer, units and emission.

Discover matches Hugging Face's ``repeat_kv``: ``reshape(expand(x[:, :, None], [B, kv, g, S,
d]), [B, kv * g, S, d])``, ``repeat_interleave(x, g, dim=1)``, and heads repeated by the
layout ops themselves (Falcon's ``broadcast_to``, :func:`repeated_heads`).

Units: ``kv_heads`` key/value heads each serve ``group_size`` consecutive query heads; query
and value units span a group and query heads are units of their own (the group arithmetic
itself is the core's: a group is one head without GQA). Rewrite: a bucket holds whole
key/value groups; keys and values are projected once per group and repeated here to the
bucket's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from torch import fx

from passes.discover.common import strip
from passes.errors import UnsupportedArchitectureError
from passes.features import AttentionFeature, OperandRecognizer, Traced
from passes.graph import arg_node, aten, is_op, module_label, shape, static

if TYPE_CHECKING:
    from passes.rewrite.attention import Bucket
    from passes.rewrite.emit import Emitter
    from passes.structure import AttentionBlock


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


def _match(node: fx.Node, role: str, heads: int, head_dim: int) -> tuple[int, fx.Node] | None:
    found = match_kv_repeat(node)
    if found is None:
        return None
    x, kv = found
    if heads % kv:
        raise UnsupportedArchitectureError(
            f"the {role} heads at {module_label(x)} are repeated from {kv} to "
            f"{heads}, which is not a whole number of query heads per key/value head"
        )
    return kv, x


#: Key/value heads repeated to the query heads, matched before layout ops (a reshape).
OPERAND = OperandRecognizer("kv_heads", frozenset({"key", "value"}), True, _match, False)


def repeated_heads(rows: list[int], heads: int, head_dim: int) -> tuple[list[int], int]:
    """Key/value heads repeated by the layout ops themselves (Falcon's ``broadcast_to`` of
    (batch, seq, kv, 1, d) to g query heads per group): the rows of the distinct heads and
    their count; ``rows`` and ``heads`` unchanged where no head repeats."""
    per_head = [tuple(rows[h * head_dim : (h + 1) * head_dim]) for h in range(heads)]
    distinct = list(dict.fromkeys(per_head))
    if len(per_head) * head_dim != len(rows) or len(distinct) == heads or heads % len(distinct):
        return rows, heads
    group = heads // len(distinct)
    if per_head != [distinct[h // group] for h in range(heads)]:
        return rows, heads
    return [r for head in distinct for r in head], len(distinct)


@dataclass(frozen=True)
class KVRepeat(AttentionFeature):
    """``heads`` key/value heads, fewer than the query heads, each read by a group of them."""

    heads: int

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> KVRepeat | None:
        key, value = traced.key, traced.value
        if key.heads != value.heads:
            raise UnsupportedArchitectureError(
                f"attention at {module_label(traced.where)} has {key.heads} key heads but "
                f"{value.heads} value heads; grainfx needs keys and values grouped alike"
            )
        return cls(key.heads) if key.heads != traced.heads else None

    def kv_heads(self) -> int | None:
        return self.heads

    def note(self, block: AttentionBlock) -> str | None:
        return (
            f"{block.num_heads} query heads share {block.kv_heads} key/value "
            f"heads (groups of {block.group_size}): query and value units span "
            f"a group, query heads are units too"
        )

    def emit_kv(
        self, emit: Emitter, nodes: Mapping[str, fx.Node], bucket: Bucket, k: fx.Node, v: fx.Node
    ) -> tuple[fx.Node, fx.Node]:
        g = bucket.block.group_size
        to_group = [bucket.groups.index(h // g) for h in bucket.heads]
        if to_group == list(range(len(bucket.groups))):
            return k, v
        select = emit.tensor(f"bucket{bucket.index}_kv", torch.tensor(to_group), False)
        k = emit.call(aten.index_select.default, k, 1, select)
        v = emit.call(aten.index_select.default, v, 1, select)
        return k, v
