"""The model's own nodes copied into a compact attention, per bucket of heads.

Shared by the core of :mod:`passes.rewrite.attention` and the attention features
(:mod:`passes.features`): head splits of projected pieces, a norm region replayed on another
head layout, chains of ops replayed with their per-head inputs sliced to a bucket's heads.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import fx

from passes.graph import aten, shape
from passes.rewrite.emit import Emitter


def split_heads(emit: Emitter, piece: fx.Node, heads: int, width: int) -> fx.Node:
    """(batch, seq, heads * width) -> (batch, heads, seq, width)."""
    return emit.call(
        aten.transpose.int, emit.call(aten.unflatten.int, piece, -1, [heads, width]), 1, 2
    )


def replay(
    emit: Emitter, nodes: Mapping[str, fx.Node], source: str, region: tuple[str, ...], x: fx.Node
) -> fx.Node:
    """The model's own nodes ``region`` (a norm over the last dim) applied to ``x``."""
    env = {nodes[source]: x}
    out = x
    with emit.graph.inserting_before(emit.anchor):
        for name in region:
            out = emit.graph.node_copy(nodes[name], lambda n: env.get(n, n))
            env[nodes[name]] = out
    return out


def replay_per_head(
    emit: Emitter,
    nodes: Mapping[str, fx.Node],
    num_heads: int,
    names: tuple[str, ...],
    env: dict[fx.Node, fx.Node],
    heads: list[int],
    bucket: int,
) -> None:
    """Copies the model's nodes ``names`` into the compact graph for one bucket, into
    ``env``: inputs ``env`` already maps are read from it, other inputs with one entry per
    head (of ``num_heads``) are sliced to ``heads``."""

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            sliced = heads_of(emit, node, num_heads, heads, bucket, f"_{node.name}")
            assert sliced is not None  # a node in, a node out
            env[node] = sliced
        return env[node]

    with emit.graph.inserting_before(emit.anchor):
        for name in names:
            env[nodes[name]] = emit.graph.node_copy(nodes[name], arg)


def heads_of(
    emit: Emitter,
    mask: fx.Node | None,
    num_heads: int,
    heads: list[int],
    bucket: int,
    tag: str = "",
) -> fx.Node | None:
    """The mask's slice for ``heads`` when it has one entry per head (of ``num_heads``),
    else the mask itself."""
    if mask is None:
        return None
    dims = shape(mask)
    per_head = dims is not None and len(dims) == 4 and dims[1] == num_heads > 1
    if not per_head or heads == list(range(num_heads)):
        return mask
    index = emit.tensor(f"bucket{bucket}{tag}_heads", torch.tensor(heads), False)
    return emit.call(aten.index_select.default, mask, 1, index)
