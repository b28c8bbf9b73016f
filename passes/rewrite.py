"""Rewrite: fold binary masks into the weights and emit a compact, standalone GraphModule.

For every attention block the subgraph from the Q/K/V projections to the output projection is
replaced by a compact one: kept query and value dimensions gathered per head, heads without
value units dropped, heads with value units but no query units attending uniformly (their
queries are zero), one ``scaled_dot_product_attention`` per bucket of heads of equal
(rounded-up, zero-padded) size, the original scale and masks / position biases kept. Projections
that read the same input are merged into one matmul. FFN blocks keep their kept neurons' rows
and columns. Empty blocks become their output bias. Dead nodes go, sdpa and dropout included.

Zero padding never becomes a parameter: the compact module stores only kept rows and columns
and pads them at run time with one gather, so its parameter count is what
:meth:`Structure.count_params` predicts.

Preserves computation: yes, against the masked graph with the same (binary) masks.
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from passes.capture import copy_metadata
from passes.errors import MaskError, TrainingGraphError
from passes.graph import (Projection, aten, attr_tensor, is_op, remove_dead_code, set_attr,
                          shape)
from passes.instrument import MASK_MODULE, mask_buffers
from passes.structure import AttentionBlock, FFNBlock, Structure

#: Heads are grouped by query and value size rounded up to a multiple of this. Measured fastest
#: (eager and compiled) in benchmarks/rewrite_speed.py on BERT-base size at 5% kept with
#: unequal heads: 1 thread, 10.0x (bucket 4) vs 9.2x (1 and 8), 2.5x (64, one padded call).
#: Bucket 1 compiled 4x slower than 4 (253 s vs 59 s for 12 layers).
DEFAULT_BUCKET = 4
KEPT_ATTR = "grainfx_kept"
COMPACT_MODULE = "compact"
_PAD = -1


@dataclass(frozen=True)
class RewriteOptions:
    """Options of :func:`rewrite`.

    bucket: heads whose query and value sizes round up to the same multiple of ``bucket`` share
        one attention call (1: one call per distinct size; head size: one padded call).
    merge_projections: compute projections that read the same input (Q, K and V) as one matmul.
    """

    bucket: int = DEFAULT_BUCKET
    merge_projections: bool = True

    def __post_init__(self):
        if not isinstance(self.bucket, int) or isinstance(self.bucket, bool) or self.bucket < 1:
            raise ValueError(f"bucket must be a positive int, got {self.bucket!r}")


def _round_up(n: int, step: int, cap: int) -> int:
    return min(cap, -(-n // step) * step)


def _check_masks(structure: Structure, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = structure.mask_shapes()
    if set(masks) != set(expected):
        raise MaskError(f"the graph's masks {sorted(masks)} do not match the structure's "
                        f"{sorted(expected)}: pass the Structure that instrumented this graph")
    checked = {}
    for name, size in expected.items():
        mask = masks[name].detach()
        if mask.shape != size:
            raise MaskError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(size)}")
        if not torch.all((mask == 0) | (mask == 1)):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise MaskError(f"mask {name!r} holds {bad:g}: rewrite needs binary masks (0 or 1); "
                            f"threshold them first, e.g. (mask > 0.5).float()")
        checked[name] = mask.bool()
    return checked


class _Emitter:
    """Adds parameters, buffers and ops for one block just before ``anchor``."""

    def __init__(self, gm: fx.GraphModule, block: str, anchor: fx.Node):
        self.gm, self.block, self.graph, self.anchor = gm, block, gm.graph, anchor
        if not hasattr(gm, COMPACT_MODULE):
            gm.add_module(COMPACT_MODULE, torch.nn.Module())

    def tensor(self, name: str, value: torch.Tensor, parameter: bool) -> fx.Node:
        target = f"{COMPACT_MODULE}.{self.block}_{name}"
        value = value.detach().clone().contiguous()
        set_attr(self.gm, target, torch.nn.Parameter(value, requires_grad=False)
                 if parameter else value)
        with self.graph.inserting_before(self.anchor):
            return self.graph.get_attr(target)

    def call(self, op, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self.graph.call_function(op, args, kwargs)

    def padded(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
               index: list[int]) -> tuple[fx.Node, fx.Node | None]:
        """Rows ``index`` of (weight, bias) with _PAD rows as zeros: kept rows are parameters,
        the padding is a gather at run time."""
        kept = [i for i in index if i != _PAD]
        w = self.tensor(f"{name}_weight", weight[kept], True)
        b = self.tensor(f"{name}_bias", bias[kept], True) if bias is not None else None
        if len(kept) == len(index):
            return w, b
        pos = torch.tensor([len(kept) if i == _PAD else kept.index(i) for i in index])
        gather = self.tensor(f"{name}_pad_index", pos, False)
        w = self.call(aten.index_select.default,
                      self.call(aten.constant_pad_nd.default, w, [0, 0, 0, 1]), 0, gather)
        if b is not None:
            b = self.call(aten.index_select.default,
                          self.call(aten.constant_pad_nd.default, b, [0, 1]), 0, gather)
        return w, b

    def constant_output(self, like: fx.Node, bias: torch.Tensor | None, width: int) -> fx.Node:
        """``bias`` (or zeros) broadcast to ``like``'s leading dims and ``width`` features."""
        ndim = len(shape(like))
        value = self.tensor("bias", bias, True) if bias is not None else self.tensor(
            "zeros", torch.zeros(width), False)
        sizes = [self.call(aten.sym_size.int, like, i) for i in range(ndim - 1)] + [width]
        return self.call(aten.expand.default, value, sizes)


def _buckets(block: AttentionBlock, qk: torch.Tensor, vo: torch.Tensor, step: int):
    """Kept heads grouped by padded (query size, value size): {(wq, wv): [head, ...]}."""
    groups = defaultdict(list)
    d = block.head_dim
    for h in range(block.num_heads):
        nv = int(vo[h].sum())
        if nv == 0:
            continue
        nq = int(qk[h].sum())
        groups[(_round_up(max(nq, 1), step, d), _round_up(nv, step, d))].append(h)
    return dict(sorted(groups.items()))


def _dims(mask_row: torch.Tensor, head: int, d: int, width: int) -> list[int]:
    dims = [head * d + int(j) for j in torch.nonzero(mask_row).flatten()]
    return dims + [_PAD] * (width - len(dims))


def _rewrite_attention(gm: fx.GraphModule, nodes: dict[str, fx.Node], block: AttentionBlock,
                       qk: torch.Tensor, vo: torch.Tensor, options: RewriteOptions) -> dict:
    qk, vo = block.expand_qk(qk), block.expand_vo(vo)
    out_node = nodes[block.o.node]
    emit = _Emitter(gm, block.name, out_node)
    x_q, x_kv = nodes[block.q.input], nodes[block.k.input]
    buckets = _buckets(block, qk, vo, options.bucket)
    o_bias = block.o.linear_bias(gm)
    heads_kept = [{"head": h, "query": int(qk[h].sum()), "value": int(vo[h].sum())}
                  for h in range(block.num_heads) if vo[h].any()]
    if not buckets:
        out_node.replace_all_uses_with(emit.constant_output(x_q, o_bias, block.o.out_features))
        return {"heads": heads_kept}
    d = block.head_dim
    index = {"q": [], "k": [], "v": []}
    for (wq, wv), heads in buckets.items():
        for role in ("q", "k"):
            index[role].append([i for h in heads for i in _dims(qk[h], h, d, wq)])
        index["v"].append([i for h in heads for i in _dims(vo[h], h, d, wv)])
    pieces = _project(emit, block, index, x_q, x_kv, options.merge_projections)
    mask = _score_mask(emit, nodes, block)
    contexts = []
    for b, ((wq, wv), heads) in enumerate(buckets.items()):
        q, k, v = (emit.call(aten.transpose.int,
                             emit.call(aten.unflatten.int, pieces[role][b], -1,
                                       [len(heads), wv if role == "v" else wq]), 1, 2)
                   for role in ("q", "k", "v"))
        ctx = emit.call(aten.scaled_dot_product_attention.default, q, k, v,
                        _heads_of(emit, mask, block, heads, b), 0.0, block.is_causal,
                        scale=block.scale)
        contexts.append(emit.call(aten.flatten.using_ints,
                                  emit.call(aten.transpose.int, ctx, 1, 2), -2, -1))
    ctx = contexts[0] if len(contexts) == 1 else emit.call(aten.cat.default, contexts, -1)
    o_index = [i for part in index["v"] for i in part]
    o_weight = block.o.linear_weight(gm)
    w_t, _ = emit.padded("o", o_weight.t(), None, o_index)
    w_o = emit.call(aten.t.default, w_t)
    b_o = emit.tensor("o_bias", o_bias, True) if o_bias is not None else None
    out = emit.call(aten.linear.default, ctx, w_o, b_o)
    out_node.replace_all_uses_with(out)
    return {"heads": heads_kept}


def _project(emit: _Emitter, block: AttentionBlock, index: dict[str, list[list[int]]],
             x_q: fx.Node, x_kv: fx.Node, merge: bool) -> dict[str, list[fx.Node]]:
    """Emit the Q, K and V projections; return their per-bucket pieces."""
    projections = {"q": (block.q, x_q), "k": (block.k, x_kv), "v": (block.v, x_kv)}
    groups: list[list[str]] = []
    for role, (proj, x) in projections.items():
        same = [g for g in groups if projections[g[0]][1] is x
                and (projections[g[0]][0].bias is None) == (proj.bias is None)]
        if merge and same:
            same[0].append(role)
        else:
            groups.append([role])
    pieces: dict[str, list[fx.Node]] = {}
    for group in groups:
        weights, biases, flat_index, sizes, offset = [], [], [], [], 0
        for role in group:
            proj: Projection = projections[role][0]
            weights.append(proj.linear_weight(emit.gm))
            biases.append(proj.linear_bias(emit.gm))
            for part in index[role]:
                flat_index += [_PAD if i == _PAD else i + offset for i in part]
                sizes.append(len(part))
            offset += proj.out_features
        weight = torch.cat(weights)
        bias = None if biases[0] is None else torch.cat(biases)
        w, b = emit.padded("".join(group), weight, bias, flat_index)
        y = emit.call(aten.linear.default, projections[group[0]][1], w, b)
        if len(sizes) == 1:
            parts = [y]
        else:
            split = emit.call(aten.split_with_sizes.default, y, sizes, -1)
            parts = [emit.call(operator.getitem, split, i) for i in range(len(sizes))]
        for role in group:
            n = len(index[role])
            pieces[role], parts = parts[:n], parts[n:]
    return pieces


def _score_mask(emit: _Emitter, nodes: dict[str, fx.Node], block: AttentionBlock) -> fx.Node | None:
    if block.kind == "sdpa":
        return nodes[block.attn_mask] if block.attn_mask else None
    mask = None
    for name in block.score_biases:
        bias = nodes[name]
        mask = bias if mask is None else emit.call(aten.add.Tensor, mask, bias)
    return mask


def _heads_of(emit: _Emitter, mask: fx.Node | None, block: AttentionBlock, heads: list[int],
              bucket: int) -> fx.Node | None:
    """The mask's slice for ``heads`` when it has one entry per head, else the mask itself."""
    if mask is None:
        return None
    dims = shape(mask)
    per_head = dims is not None and len(dims) == 4 and dims[1] == block.num_heads > 1
    if not per_head or heads == list(range(block.num_heads)):
        return mask
    index = emit.tensor(f"bucket{bucket}_heads", torch.tensor(heads), False)
    return emit.call(aten.index_select.default, mask, 1, index)


def _rewrite_ffn(gm: fx.GraphModule, nodes: dict[str, fx.Node], block: FFNBlock,
                 mask: torch.Tensor) -> dict:
    kept = torch.nonzero(mask).flatten()
    if kept.numel() == 0:
        down = nodes[block.down.node]
        emit = _Emitter(gm, block.name, down)
        down.replace_all_uses_with(emit.constant_output(
            nodes[block.up.input], block.down.linear_bias(gm), block.down.out_features))
        return {"ffn": 0}
    for proj in (block.up, block.gate):
        if proj is not None:
            _slice_outputs(gm, proj, kept)
    _slice_inputs(gm, block.down, kept)
    width, new = block.width, int(kept.numel())
    for name in (block.up.node, block.down.input_user, *block.region):
        node = nodes[name]
        if is_op(node, [aten.view.default, aten.reshape.default]):
            sizes = list(node.args[1])
            if sizes and sizes[-1] == width:
                node.args = (node.args[0], sizes[:-1] + [new])
    return {"ffn": new}


def _slice_outputs(gm: fx.GraphModule, proj: Projection, kept: torch.Tensor) -> None:
    w = attr_tensor(gm, proj.weight).detach()
    set_attr(gm, proj.weight, torch.nn.Parameter(
        (w[:, kept] if proj.transposed else w[kept]).clone(), requires_grad=False))
    if proj.bias is not None:
        b = attr_tensor(gm, proj.bias).detach()
        set_attr(gm, proj.bias, torch.nn.Parameter(b[kept].clone(), requires_grad=False))


def _slice_inputs(gm: fx.GraphModule, proj: Projection, kept: torch.Tensor) -> None:
    w = attr_tensor(gm, proj.weight).detach()
    set_attr(gm, proj.weight, torch.nn.Parameter(
        (w[kept] if proj.transposed else w[:, kept]).clone(), requires_grad=False))


def _is_mask_value(node) -> bool:
    """True for the (expanded, flattened) get_attr of a mask buffer."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        node = node.args[0]
        if isinstance(node, (list, tuple)):
            node = node[0]
    return isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).startswith(
        MASK_MODULE + ".")


def _remove_mask_multiplies(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if is_op(node, [aten.mul.Tensor]) and _is_mask_value(node.args[1]):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def rewrite(masked_gm: fx.GraphModule, structure: Structure, *, bucket: int | None = None,
            merge_projections: bool = True) -> fx.GraphModule:
    """Fold the binary masks of ``masked_gm`` into a compact, standalone GraphModule.

    Args:
        masked_gm: an eval-mode graph from :func:`passes.instrument` with masks of 0 and 1.
        structure: the Structure it was instrumented with.
        bucket: head-size granularity of the attention buckets (default
            :data:`DEFAULT_BUCKET`); see :class:`RewriteOptions`.
        merge_projections: merge Q, K and V into one matmul.

    Returns:
        A new GraphModule (``masked_gm`` is not changed) whose outputs equal ``masked_gm``'s,
        with ``grainfx_kept`` describing what was kept.

    Raises:
        NotInstrumentedError: ``masked_gm`` has no masks.
        MaskError: masks that are not binary or do not match ``structure``.
        TrainingGraphError: ``masked_gm`` was captured in train mode.
    """
    options = RewriteOptions(DEFAULT_BUCKET if bucket is None else bucket, merge_projections)
    masks = _check_masks(structure, mask_buffers(masked_gm))
    for node in masked_gm.graph.nodes:
        if is_op(node, [aten.dropout.default]) and len(node.args) > 2 and node.args[2]:
            raise TrainingGraphError(
                f"{node.name} is a live dropout: rewrite makes an inference model from the "
                f"eval-mode graph; capture with train=False (capture_pair's first graph)")
    gm = copy.deepcopy(masked_gm)
    copy_metadata(masked_gm, gm)
    _remove_mask_multiplies(gm.graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = []
    for i in range(max(len(structure.attention), len(structure.ffn))):
        layers.append({"layer": i})
    for i, block in enumerate(structure.attention):
        layers[i].update(heads_dense=block.num_heads, head_dim=block.head_dim)
    for i, block in enumerate(structure.ffn):
        layers[i]["ffn_dense"] = block.width
    for i, block in enumerate(structure.attention):
        layers[i].update(_rewrite_attention(gm, nodes, block, masks[f"{block.name}.qk"],
                                            masks[f"{block.name}.vo"], options))
    for i, block in enumerate(structure.ffn):
        layers[i].update(_rewrite_ffn(gm, nodes, block, masks[block.name]))
    gm.graph.lint()
    remove_dead_code(gm)
    if hasattr(gm, MASK_MODULE):
        delattr(gm, MASK_MODULE)
    gm.recompile()
    params = sum(p.numel() for p in gm.parameters())
    setattr(gm, KEPT_ATTR, {
        "layers": layers,
        "hidden": structure.attention[0].q.in_features,
        "parameters": params,
        "unit_parameters": structure.kept_unit_params(masks),
        "unit_parameters_dense": structure.unit_params,
        "parameters_dense": structure.total_params,
        "density": structure.density(masks),
        "bucket": options.bucket,
        "merge_projections": options.merge_projections,
    })
    return gm
