"""Discover: find attention blocks, FFN blocks and layer outputs from a graph's dataflow.

Attention is found from each ``scaled_dot_product_attention`` node and each softmax that sits
between two matmuls, then traced back to the Q, K and V projections (``aten.linear``, GPT-2's
view-addmm-view, or pieces of a fused projection) through small recognizers: head splits,
casts, scales, norms over the head dims, rotary embeddings and key/value head repeats
(:mod:`passes.discover.operand`), and forward through the head merge to the output
projection; then the block's attention features are found (:mod:`passes.features`). Products
of the queries or keys with projected position embeddings added to the scores are
disentangled relative-position terms (DeBERTa). An FFN is a projection whose
output reaches exactly one other projection through elementwise ops only, and whose result
is added back to the residual stream. Module names are used in messages only.

Preserves computation: it does not change the graph.
"""

from __future__ import annotations

import warnings

from torch import fx

from passes.contracts import contract
from passes.discover.attention import SDPA, SOFTMAX, eager_block, sdpa_block
from passes.discover.ffn import ffn_block, residual_of, stream_of
from passes.discover.scores import score_source
from passes.errors import (
    NoAttentionFoundError,
    UncoveredLayersWarning,
    UnsupportedArchitectureError,
)
from passes.graph import (
    NORM_OPS,
    ancestors,
    aten,
    attr_tensor,
    is_impure,
    is_op,
    live_attrs,
    live_users,
    match_projection,
    module_label,
    shape,
)
from passes.structure import AttentionBlock, FFNBlock, Structure

__all__ = ["discover"]


def _layer_output(add: fx.Node) -> fx.Node:
    users = live_users(add)
    if len(users) == 1 and is_op(users[0], NORM_OPS):
        return users[0]
    return add


def _uncovered(
    gm: fx.GraphModule,
    attention: list[AttentionBlock],
    ffn: list[FFNBlock],
    layer_outputs: list[str],
    stream: fx.Node,
) -> tuple[str, ...]:
    """Weights of linear layers that no block covers between the first attention projection
    and the end of the last layer (its last add of two computed tensors of the residual
    stream's shape, that of ``stream``, the first block's input)."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    covered = {p.weight for b in attention for p in (b.q, b.k, b.v, b.o) + b.feature_projections}
    covered |= {p.weight for b in ffn for p in (b.up, b.gate, b.down) if p is not None}
    start = min(order[p.node] for b in attention for p in (b.q, b.k, b.v))
    residual = shape(stream)
    adds = [
        order[n.name]
        for n in gm.graph.nodes
        if is_op(n, [aten.add.Tensor])
        and all(isinstance(a, fx.Node) and a.op == "call_function" for a in n.args[:2])
        and shape(n) == residual
    ]
    end = max([order[b.o.node] for b in attention] + [order[n] for n in layer_outputs] + adds)
    found = (match_projection(n) for n in gm.graph.nodes if start <= order[n.name] <= end)
    return tuple(
        dict.fromkeys(p.weight for p in found if p is not None and p.weight not in covered)
    )


def _score_inputs(
    block: AttentionBlock, nodes: dict[str, fx.Node]
) -> list[tuple[fx.Node, fx.Node]]:
    """(consumer, input) edges into the scores of ``block``, from its features: sdpa's mask,
    eager biases, and what the ops of a replayed chain read besides the chain."""
    return [edge for f in block.features for edge in f.score_inputs(block, nodes)]


def _score_params(
    gm: fx.GraphModule, attention: list[AttentionBlock], nodes: dict[str, fx.Node]
) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """Parameters read only through the scores of attention blocks, with those blocks."""
    cut: set[tuple[fx.Node, fx.Node]] = set()
    readers: dict[fx.Node, set[str]] = {}
    for block in attention:
        for edge in _score_inputs(block, nodes):
            cut.add(edge)
            for attr in ancestors([edge[1]]):
                if attr.op == "get_attr":
                    readers.setdefault(attr, set()).add(block.name)
    if not readers:
        return ()
    seen = ancestors((n for n in gm.graph.nodes if is_impure(n)), cut)  # live without them
    params = dict(gm.named_parameters(remove_duplicate=False))
    units = {  # relative-position projections of their own are in units already
        name for b in attention for p in b.feature_projections for name in (p.weight, p.bias)
    }
    return tuple(
        (params[a.target].numel(), tuple(sorted(blocks)))
        for a, blocks in readers.items()
        if a not in seen and a.target in params and a.target not in units
    )


def _refuse_shared_weights(
    gm: fx.GraphModule, attention: list[AttentionBlock], ffn: list[FFNBlock]
) -> None:
    """Blocks that share a projection weight (ALBERT shares one layer's weights across all)
    cannot keep different units each."""
    owner: dict[int, str] = {}
    for block in attention + ffn:
        projections = (
            (block.q, block.k, block.v, block.o)
            if isinstance(block, AttentionBlock)
            else (block.up, block.gate, block.down)
        )
        for weight in {p.weight for p in projections if p is not None}:
            key = id(attr_tensor(gm, weight))
            if owner.setdefault(key, block.name) != block.name:
                raise UnsupportedArchitectureError(
                    f"{block.name} and {owner[key]} share the weight {weight} (layers with "
                    f"shared weights, as in ALBERT): grainfx prunes each layer on its own, so "
                    f"layers must not share weights"
                )


def _found_in(gm: fx.GraphModule, structure: Structure) -> str | None:
    """Every projection the structure names is a node of ``gm``, and it has units to prune."""
    names = {n.name for n in gm.graph.nodes}
    for block in structure.attention:
        for projection in (block.q, block.k, block.v, block.o):
            if projection.node not in names:
                return f"{block.name} names a node {projection.node!r} that the graph lacks"
    for ffn in structure.ffn:
        for projection in (ffn.up, ffn.down):
            if projection.node not in names:
                return f"{ffn.name} names a node {projection.node!r} that the graph lacks"
    return None if structure.mask_shapes() else "the structure has no unit to prune"


@contract(preserves_computation=False, ensures=lambda args, found: _found_in(args["gm"], found))
def discover(gm: fx.GraphModule) -> Structure:
    """Find the attention blocks, FFN blocks, layer outputs and prunable units of ``gm``.

    Raises:
        NoAttentionFoundError: the graph has no attention block.
        UnsupportedArchitectureError: an attention variant grainfx cannot prune exactly.
        DiscoverError: an attention pattern that cannot be traced; the message names the node.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    attention: list[AttentionBlock] = []
    for node in gm.graph.nodes:
        name = f"attn{len(attention)}"
        if is_op(node, SDPA):
            attention.append(sdpa_block(node, name))
        elif is_op(node, SOFTMAX) and node.args[0] is not None:
            block = eager_block(node, name)
            if block is not None:
                attention.append(block)
    if not attention:
        softmaxes = [n for n in gm.graph.nodes if is_op(n, SOFTMAX)]
        if softmaxes:
            source = score_source(softmaxes[0])
            raise NoAttentionFoundError(
                f"no attention found: {len(softmaxes)} softmax nodes read no q @ k^T matmul; "
                f"the first, at {module_label(softmaxes[0])}, reads {source.target} "
                f"({source.name}) where the matmul (aten.matmul / bmm, then elementwise ops "
                f"only) was expected; products in a (batch * heads) layout are followed where "
                f"their operands are head merges of (batch, heads, seq, head size) tensors "
                f"(print(gm.graph) shows what was captured)"
            )
        raise NoAttentionFoundError(
            f"no attention found in the graph of {len(nodes)} nodes: grainfx looks for "
            f"scaled_dot_product_attention or matmul-softmax-matmul between projections; pass "
            f"a transformer model (print(gm.graph) shows what was captured)"
        )
    taken = {p.node for b in attention for p in (b.q, b.k, b.v, b.o)}
    ffn: list[FFNBlock] = []
    ffn_adds: list[fx.Node] = []
    for node in gm.graph.nodes:
        found = ffn_block(node, taken, nodes, f"ffn{len(ffn)}")
        if found is not None:
            fb, add = found
            ffn.append(fb)
            ffn_adds.append(add)
            taken.update(p.node for p in (fb.up, fb.down, fb.gate) if p is not None)
    _refuse_shared_weights(gm, attention, ffn)
    block_input = nodes[attention[0].q.input]
    first = residual_of(nodes[attention[0].o.node], block_input)
    embedding = first[1] if first is not None else stream_of(block_input)
    layer_outputs = [embedding.name] + [_layer_output(add).name for add in ffn_adds]
    uncovered = _uncovered(gm, attention, ffn, layer_outputs, block_input)
    if uncovered:
        warnings.warn(
            f"grainfx found no unit for the linear layers {', '.join(uncovered)} "
            f"inside the transformer layers: they stay whole. print(structure) "
            f"shows what is covered; report the architecture if they should be "
            f"pruned",
            UncoveredLayersWarning,
            stacklevel=2,
        )
    score_params = _score_params(gm, attention, nodes)
    used = live_attrs(gm)  # a parameter the graph never reads (DINOv2's mask token) goes
    params = {
        id(p): p.numel() for name, p in gm.named_parameters(remove_duplicate=False) if name in used
    }
    return Structure(
        attention=tuple(attention),
        ffn=tuple(ffn),
        layer_outputs=tuple(layer_outputs),
        total_params=sum(params.values()),
        uncovered=uncovered,
        score_params=score_params,
    )
