"""Rewrite: fold binary masks into the weights and emit a compact, standalone GraphModule.

For every attention block the subgraph from the Q/K/V projections to the output projection is
replaced by a compact one: kept query and value dimensions gathered per head, heads without
value units dropped, heads with value units but no query units computed without scores as
the (masked, or running under a causal mask) mean of their values where no position bias
makes their uniform attention depend on the position, one ``scaled_dot_product_attention`` per
bucket of the other heads of equal (rounded-up, zero-padded) size, the original scale and
masks / position biases kept. Projections
that read the same input are merged into one matmul. FFN blocks keep their kept neurons' rows
and columns. Empty blocks become their output bias. Dead nodes go, sdpa and dropout included.

Zero padding never becomes a parameter: the compact module stores only kept rows and columns
and pads them at run time with one gather, so its parameter count is what
:meth:`Structure.count_params` predicts.

Preserves computation: yes, against the masked graph with the same (binary) masks; in checked
mode (:mod:`passes.contracts`) that, and the parameter count, are checked after every rewrite.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx

from passes.capture import EXAMPLE_INPUTS_ATTR, copy_metadata
from passes.contracts import contract, seeded_call
from passes.errors import MaskError, TrainingGraphError
from passes.graph import aten, is_op, remove_dead_code
from passes.instrument import MASK_MODULE, mask_buffers
from passes.record import KeptStructure, LayerKept
from passes.rewrite.attention import rewrite_attention
from passes.rewrite.buckets import BucketCost
from passes.rewrite.emit import COMPACT_MODULE
from passes.rewrite.ffn import rewrite_ffn
from passes.structure import Structure

__all__ = [
    "rewrite",
    "RewriteOptions",
    "DEFAULT_BUCKET",
    "DEFAULT_SHAPE",
    "is_shape",
    "KEPT_ATTR",
    "COMPACT_MODULE",
]

#: Heads are grouped by query and value size rounded up to a granularity: without a cost
#: model, 4. Measured in benchmarks/rewrite_speed.py on BERT-base size at 5% kept with unequal
#: heads, a fixed granularity of 4 was fastest (1 thread, 10.0x, vs 9.2x for 1 and 8, 2.5x for
#: 64, one padded call); 1 compiled 4x slower than 4 (253 s vs 59 s for 12 layers). With a cost
#: model (``bucket="auto"``, the default when a ``cost`` is given) it is chosen per block
#: (:mod:`passes.rewrite.buckets`); grainfx gives the measured one (``grainfx.buckets``).
DEFAULT_BUCKET = 4
#: (batch, sequence) the cost model of ``bucket="auto"`` prices, when none is named.
DEFAULT_SHAPE = (8, 128)
KEPT_ATTR = "grainfx_kept"


def is_shape(value: object) -> bool:
    """True for a (batch, sequence) shape: a tuple or list of two ints >= 1."""
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
    )


@dataclass(frozen=True)
class RewriteOptions:
    """Options of :func:`rewrite`.

    bucket: heads whose query and value sizes round up to the same multiple of ``bucket`` share
        one attention call (1: one call per distinct size; head size: one padded call);
        ``"auto"``: per block, the multiple whose attention calls the cost model given to
        :func:`rewrite` prices cheapest (the choice is recorded per layer).
    shape: (batch, sequence) that the cost model of ``bucket="auto"`` priced (recorded).
    merge_projections: compute projections that read the same input (Q, K and V; an FFN's up
        and gate) as one matmul.
    """

    bucket: int | str = DEFAULT_BUCKET
    shape: tuple[int, int] = DEFAULT_SHAPE
    merge_projections: bool = True

    def __post_init__(self) -> None:
        b = self.bucket
        if b != "auto" and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"bucket must be a positive int or 'auto', got {b!r}")
        if not is_shape(self.shape):
            raise ValueError(f"shape must be (batch, sequence), two ints >= 1, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(self.shape))


def _check_masks(structure: Structure, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = structure.mask_shapes()
    if set(masks) != set(expected):
        raise MaskError(
            f"the graph's masks {sorted(masks)} do not match the structure's "
            f"{sorted(expected)}: pass the Structure that instrumented this graph"
        )
    checked = {}
    for name, size in expected.items():
        mask = masks[name].detach()
        if mask.shape != size:
            raise MaskError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(size)}")
        if not torch.all((mask == 0) | (mask == 1)):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise MaskError(
                f"mask {name!r} holds {bad:g}: rewrite needs binary masks (0 or 1); "
                f"threshold them first, e.g. (mask > 0.5).float()"
            )
        checked[name] = mask.bool()
    return checked


def _is_mask_value(node: fx.node.Argument) -> bool:
    """True for the (expanded, flattened) get_attr of a mask buffer."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        node = node.args[0]
        if isinstance(node, (list, tuple)):
            node = node[0]
    return (
        isinstance(node, fx.Node)
        and node.op == "get_attr"
        and str(node.target).startswith(MASK_MODULE + ".")
    )


def _remove_mask_multiplies(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if is_op(node, [aten.mul.Tensor]) and _is_mask_value(node.args[1]):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _as_counted(masked_gm: fx.GraphModule, structure: Structure, gm: fx.GraphModule) -> str | None:
    """The compact module holds the parameters :meth:`Structure.count_params` predicts."""
    expected = structure.count_params(_check_masks(structure, mask_buffers(masked_gm)))
    params = sum(p.numel() for p in gm.parameters())
    if params != expected:
        return f"the compact module has {params:,} parameters, count_params says {expected:,}"
    if not isinstance(getattr(gm, KEPT_ATTR, None), KeptStructure):
        return "the compact module carries no kept-structure record"
    return None


def _masked_and_compact(
    masked_gm: fx.GraphModule, gm: fx.GraphModule
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of both on the example inputs, where the graph has them (a module loaded from
    a file has none)."""
    inputs = getattr(masked_gm, EXAMPLE_INPUTS_ATTR, None)
    if inputs is None:
        return {}, {}
    return seeded_call(masked_gm, inputs), seeded_call(gm, inputs)


@contract(
    preserves_computation=True,
    ensures=lambda args, gm: _as_counted(args["masked_gm"], args["structure"], gm),
    compare=lambda args, gm: _masked_and_compact(args["masked_gm"], gm),
)
def rewrite(
    masked_gm: fx.GraphModule,
    structure: Structure,
    *,
    bucket: int | str | None = None,
    shape: tuple[int, int] = DEFAULT_SHAPE,
    merge_projections: bool = True,
    cost: BucketCost | None = None,
) -> fx.GraphModule:
    """Fold the binary masks of ``masked_gm`` into a compact, standalone GraphModule.

    A pure pass: the result depends on its arguments alone (no timing, no file).

    Args:
        masked_gm: an eval-mode graph from :func:`passes.instrument` with masks of 0 and 1.
        structure: the Structure it was instrumented with.
        bucket: head-size granularity of the attention buckets, or ``"auto"``; default
            ``"auto"`` when a ``cost`` is given, else :data:`DEFAULT_BUCKET`; see
            :class:`RewriteOptions`.
        shape: (batch, sequence) the model will mostly serve, that ``cost`` priced (recorded).
        merge_projections: merge Q, K and V, and up and gate, into one matmul.
        cost: the cost model ``bucket="auto"`` chooses by (:data:`passes.rewrite.buckets.
            BucketCost`; ``grainfx.buckets.BucketTimer`` measures one on this machine).

    Returns:
        A new GraphModule (``masked_gm`` is not changed) whose outputs equal ``masked_gm``'s,
        with ``grainfx_kept``, a :class:`~passes.record.KeptStructure`, describing what was
        kept.

    Raises:
        NotInstrumentedError: ``masked_gm`` has no masks.
        MaskError: masks that are not binary or do not match ``structure``.
        TrainingGraphError: ``masked_gm`` was captured in train mode.
        ValueError: ``bucket="auto"`` without a ``cost``, or options out of range.
    """
    if bucket is None:
        bucket = DEFAULT_BUCKET if cost is None else "auto"
    options = RewriteOptions(bucket, shape, merge_projections)
    if options.bucket == "auto" and cost is None:
        raise ValueError(
            "bucket='auto' chooses by a cost model: pass cost= (grainfx.buckets.BucketTimer "
            "measures one on this machine; grainfx.buckets.rewrite does both) or a fixed bucket"
        )
    masks = _check_masks(structure, mask_buffers(masked_gm))
    for node in masked_gm.graph.nodes:
        if is_op(node, [aten.dropout.default]) and len(node.args) > 2 and node.args[2]:
            raise TrainingGraphError(
                f"{node.name} is a live dropout: rewrite makes an inference model from the "
                f"eval-mode graph; capture with train=False (capture_pair's first graph)"
            )
    gm = copy.deepcopy(masked_gm)
    copy_metadata(masked_gm, gm)
    _remove_mask_multiplies(gm.graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = []
    for i in range(max(len(structure.attention), len(structure.ffn))):
        layers.append({"layer": i})
    for i, block in enumerate(structure.attention):
        layers[i].update(heads_dense=block.num_heads, head_dim=block.head_dim)
        if block.group_size > 1:
            layers[i]["kv_heads_dense"] = block.kv_heads
    for i, ffn in enumerate(structure.ffn):
        layers[i]["ffn_dense"] = ffn.width
    chooser = cost if options.bucket == "auto" else None
    for i, block in enumerate(structure.attention):
        layers[i].update(
            rewrite_attention(
                gm, nodes, block, masks, options.bucket, options.merge_projections, chooser
            )
        )
    for i, ffn in enumerate(structure.ffn):
        layers[i].update(rewrite_ffn(gm, nodes, ffn, masks[ffn.name], options.merge_projections))
    gm.graph.lint()
    remove_dead_code(gm)
    if hasattr(gm, MASK_MODULE):
        delattr(gm, MASK_MODULE)
    gm.recompile()
    params = sum(p.numel() for p in gm.parameters())
    kept = KeptStructure(
        layers=tuple(LayerKept.from_dict(layer) for layer in layers),
        hidden=structure.attention[0].q.in_features,
        parameters=params,
        unit_parameters=structure.kept_unit_params(masks),
        unit_parameters_dense=structure.unit_params,
        parameters_dense=structure.total_params,
        uncovered=structure.uncovered,
        density=structure.density(masks),
        bucket=options.bucket,
        bucket_shape=options.shape,
        merge_projections=options.merge_projections,
    )
    setattr(gm, KEPT_ATTR, kept)
    return gm
