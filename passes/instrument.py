"""Instrument: insert differentiable dimension masks into a captured graph.

One mask per block and kind, stored as buffers of a ``grain_masks`` submodule and multiplied in
at the narrowest point: the queries the attention op reads (qk), the context before the output
projection (vo, and the query-head mask under GQA) and the FFN activation before the down
projection (ffn). Masks at one leave the outputs unchanged. Masks require grad, so a backward
pass gives dL/dm; :func:`record_mask_grads` collects it for the backward passes run inside it
only (the mechanism behind GRAIN's gradient separation).

Preserves computation: yes, with all masks at one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import fx

from passes.capture import EXAMPLE_INPUTS_ATTR, derive
from passes.contracts import contract, seeded_call
from passes.errors import MaskError, NotInstrumentedError, StructureMismatchError
from passes.graph import aten, shape
from passes.structure import AttentionBlock, Structure

MASK_MODULE = "grain_masks"


def _buffer_name(mask: str) -> str:
    """Buffer names cannot hold dots: ``attn0.qk`` is stored as ``attn0__qk``."""
    return mask.replace(".", "__")


def _mask_name(buffer: str) -> str:
    return buffer.replace("__", ".")


#: Graph ops that turn a stored mask into its per-head layout: (graph, mask node) -> node.
Expand = Callable[[fx.Graph, fx.Node], fx.Node]


def _insert_mask(
    graph: fx.Graph,
    at: fx.Node,
    mask: str,
    expand: Expand | None,
    user: fx.Node | None,
    shape_: list[int] | None = None,
) -> fx.Node:
    """Multiply ``at`` by the mask ``mask``: for all users of ``at``, or for ``user``; return
    the product.

    ``expand`` (or None) adds the graph ops that turn the stored mask into per-head layout;
    the result is reshaped to ``shape_`` (default: flat).
    """
    with graph.inserting_before(at.next):
        node = graph.get_attr(f"{MASK_MODULE}.{_buffer_name(mask)}")
        if expand is not None:
            node = expand(graph, node)
        flat = graph.call_function(aten.reshape.default, (node, shape_ or [-1]))
        mul = graph.call_function(aten.mul.Tensor, (at, flat))
    if user is None:
        at.replace_all_uses_with(mul, delete_user_cb=lambda n: n is not mul)
    else:
        user.replace_input_with(at, mul)
    return mul


def _node(nodes: dict[str, fx.Node], name: str | None, width: int) -> fx.Node:
    """The node ``name``, checked to hold ``width`` features: a Structure names nodes of the
    graph it was discovered on, and another graph may reuse a name for something else."""
    node = nodes.get(name) if name is not None else None
    dims = shape(node) if node is not None else None
    if node is None or dims is None or dims[-1] != width:
        raise StructureMismatchError(
            f"node {name!r} of the structure is not in this graph with {width} features: a "
            f"Structure only fits the graph it was discovered on; run passes.discover on this "
            f"graph (for capture_pair, discover the train graph and the eval graph each)"
        )
    return node


def _reader(nodes: dict[str, fx.Node], name: str | None, value: fx.Node) -> fx.Node:
    """The node ``name``, checked to read ``value``."""
    reader = nodes.get(name) if name is not None else None
    if reader is None or value not in reader.all_input_nodes:
        raise StructureMismatchError(
            f"node {name!r} of the structure does not read {value.name!r} in this graph: a "
            f"Structure only fits the graph it was discovered on; run passes.discover on this "
            f"graph"
        )
    return reader


def _mask_query_sites(
    graph: fx.Graph, nodes: dict[str, fx.Node], block: AttentionBlock, q: fx.Node, masked: fx.Node
) -> None:
    """The query mask where the features put it besides the queries the attention reads
    (:meth:`passes.features.AttentionFeature.query_mask_sites`; one query unit spans every
    use of its W_Q and W_K rows): nodes that read the queries read the masked ones,
    operands of (heads, seq, dims) are multiplied by the mask."""
    for feature in block.features:
        for site, name in feature.query_mask_sites(block):
            if site == "reader":
                _reader(nodes, name, q).replace_input_with(q, masked)
            else:
                pos = _node(nodes, name, block.head_dim)
                shape_ = [block.num_heads, 1, block.head_dim]
                _insert_mask(graph, pos, block.mask_names()["qk"], _expand_qk(block), None, shape_)


def _expand_qk(block: AttentionBlock) -> Expand | None:
    """Graph ops that turn a (kv heads x query units) mask into (heads x head_dim), or None:
    the features' expansion of units into head dims (RoPE's pairs), then the groups."""
    if block.group_size == 1 and not block.rotary_dims // 2:
        return None

    def expand(graph: fx.Graph, node: fx.Node) -> fx.Node:
        for feature in block.features:
            node = feature.expand_query_mask(graph, node, block)
        return _repeat_heads(graph, node, block.group_size)

    return expand


def _repeat_heads(graph: fx.Graph, node: fx.Node, times: int) -> fx.Node:
    if times == 1:
        return node
    return graph.call_function(aten.repeat_interleave.self_int, (node, times, 0))


def _expand_vo(block: AttentionBlock) -> Expand | None:
    """Graph ops that turn the vo mask (and the query-head mask) into (heads x head_dim)."""
    if block.group_size == 1:
        return None

    def expand(graph: fx.Graph, node: fx.Node) -> fx.Node:
        node = _repeat_heads(graph, node, block.group_size)
        heads = graph.get_attr(f"{MASK_MODULE}.{_buffer_name(block.mask_names()['heads'])}")
        heads = graph.call_function(aten.unsqueeze.default, (heads, 1))
        return graph.call_function(aten.mul.Tensor, (node, heads))

    return expand


def _masked_by(result: fx.GraphModule, structure: Structure) -> str | None:
    """One mask per unit group of ``structure``, of its shape."""
    buffers = mask_buffers(result)
    for name, size in structure.mask_shapes().items():
        if name not in buffers or buffers[name].shape != size:
            return f"mask {name!r} is missing or not of shape {tuple(size)}"
    return None


def _graphs_at_ones(
    gm: fx.GraphModule, result: fx.GraphModule
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The outputs of ``gm`` and of ``result`` on the example inputs (dropout drawn alike),
    where every mask is one (other masks, given to share, change the computation) and ``gm``
    has example inputs (a module loaded from a file has none)."""
    inputs = getattr(gm, EXAMPLE_INPUTS_ATTR, None)
    if inputs is None or not all(bool((m == 1).all()) for m in mask_buffers(result).values()):
        return {}, {}
    return seeded_call(gm, inputs), seeded_call(result, inputs)


@contract(
    preserves_computation=True,
    ensures=lambda args, result: _masked_by(result, args["structure"]),
    compare=lambda args, result: _graphs_at_ones(args["gm"], result),
)
def instrument(
    gm: fx.GraphModule, structure: Structure, masks: Mapping[str, torch.Tensor] | None = None
) -> fx.GraphModule:
    """Return a copy of ``gm`` with a mask multiplied into every attention and FFN block.

    Args:
        gm: a graph from :func:`passes.capture`, and ``structure`` what
            :func:`passes.discover` found in that very graph.
        masks: mask tensors to use instead of new all-ones masks, e.g. those of another
            instrumented graph, so that a train-mode and an eval-mode graph share them.

    The returned module shares parameters with ``gm``; ``gm`` itself is not changed.

    Raises:
        MaskError: ``gm`` already has masks, or ``masks`` do not fit ``structure``.
        StructureMismatchError: ``structure`` was discovered on another graph.
    """
    if hasattr(gm, MASK_MODULE):
        raise MaskError(
            "this graph is instrumented already: instrument the captured graph, "
            "or change the masks of this one with passes.set_masks"
        )
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    nodes = {n.name: n for n in graph.nodes}
    holder = torch.nn.Module()
    shapes = structure.mask_shapes()
    for name, size in shapes.items():
        if masks is not None:
            if name not in masks or masks[name].shape != size:
                raise MaskError(f"mask {name!r} must be given with shape {tuple(size)} to share it")
            tensor = masks[name]
        else:
            tensor = torch.ones(size, requires_grad=True)
        holder.register_buffer(_buffer_name(name), tensor)
    for block in structure.attention:
        names = block.mask_names()
        if "qk" in names:
            q = _node(nodes, block.q_operand, block.head_dim)
            masked = _insert_mask(
                graph,
                q,
                names["qk"],
                _expand_qk(block),
                _reader(nodes, block.q_reader, q),
                [block.num_heads, 1, block.head_dim],
            )
            _mask_query_sites(graph, nodes, block, q, masked)
        ctx = _node(nodes, block.o.input, block.num_heads * block.head_dim)
        _insert_mask(
            graph, ctx, names["vo"], _expand_vo(block), _reader(nodes, block.o.input_user, ctx)
        )
    for ffn in structure.ffn:
        act = _node(nodes, ffn.down.input, ffn.width)
        _insert_mask(graph, act, ffn.name, None, _reader(nodes, ffn.down.input_user, act))
    new = derive(gm, graph, root=_with_masks(gm, holder))
    new.graph.lint()
    return new


def _with_masks(gm: fx.GraphModule, holder: torch.nn.Module) -> torch.nn.Module:
    """A root module for the instrumented graph: gm's attributes plus the mask holder."""
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, param in gm.named_parameters(recurse=False):
        root.register_parameter(name, param)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    root.add_module(MASK_MODULE, holder)
    return root


def mask_buffers(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The live mask tensors of an instrumented graph, keyed by mask name.

    Raises NotInstrumentedError when ``gm`` holds no masks.
    """
    holder = getattr(gm, MASK_MODULE, None)
    if holder is None:
        raise NotInstrumentedError(
            "this graph has no masks: run passes.instrument(gm, structure) first and pass the "
            "module it returns"
        )
    return {_mask_name(name): buf for name, buf in holder.named_buffers()}


def set_masks(gm: fx.GraphModule, masks: Mapping[str, torch.Tensor]) -> None:
    """Copy ``masks`` (``{name: tensor}``, a subset is fine) into the graph's mask tensors.

    Raises:
        NotInstrumentedError: ``gm`` was not instrumented.
        MaskError: an unknown mask name or a tensor of the wrong shape.
    """
    live = mask_buffers(gm)
    for name, value in masks.items():
        if name not in live:
            raise MaskError(f"unknown mask {name!r}; this graph has {sorted(live)}")
        value = torch.as_tensor(value)
        if value.shape != live[name].shape:
            raise MaskError(
                f"mask {name!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(live[name].shape)} (structure.mask_shapes() lists them)"
            )
    with torch.no_grad():
        for name, value in masks.items():
            live[name].copy_(torch.as_tensor(value))


def get_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Detached copies of the graph's current masks."""
    return {name: buf.detach().clone() for name, buf in mask_buffers(gm).items()}


class MaskGradients(dict):
    """Mask gradients recorded by :func:`record_mask_grads`, ``{mask name: tensor}``."""


@contextlib.contextmanager
def record_mask_grads(gm: fx.GraphModule) -> Iterator[MaskGradients]:
    """Record dL/dmask for the backward passes run inside this context only.

    Example (GRAIN's gradient separation)::

        out = masked(**batch)
        with record_mask_grads(masked) as grads:
            kd_loss(out).backward(retain_graph=True)   # importance sees this loss only
        hidden_loss(out).backward()                    # weights see both losses

    The recorded gradients are summed over all backward passes inside the context. The masks'
    own ``.grad`` is not used by grainfx.
    """
    recorded = MaskGradients()
    handles = []
    for name, buf in mask_buffers(gm).items():
        if not buf.requires_grad:
            raise MaskError(f"mask {name!r} does not require grad; masks from instrument do")

        def hook(grad: torch.Tensor, name: str = name) -> torch.Tensor:
            recorded[name] = recorded[name] + grad if name in recorded else grad.detach().clone()
            return grad

        handles.append(buf.register_hook(hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
