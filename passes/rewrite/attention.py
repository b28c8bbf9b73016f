"""Rewrite of attention blocks into buckets of heads of equal (padded) size.

The subgraph from the Q/K/V projections to the output projection is replaced: kept query and
value dims gathered per head, heads without value units dropped, one
``scaled_dot_product_attention`` per bucket with the original scale and masks / position
biases. Heads with value units but no query units attend uniformly: where the mask shows
that (see :mod:`passes.rewrite.uniform`) they are the mean of their values, without scores,
else a bucket with a zero query. A bucket holds whole key/value groups (one head each
without GQA), projected once per group.

This is the core; what varies is emitted by the block's features (:mod:`passes.features`),
through hooks called in feature order: ``project`` (the projections, where a feature emits
them itself: relative-position terms), per bucket ``emit_qk`` (head norms replayed, then
RoPE), ``emit_kv`` (GQA's repeat of keys and values to the query heads), ``emit_terms``
(relative-position terms) and ``emit_context`` (a replayed score chain instead of sdpa);
``sdpa_biases`` are what the sdpa call adds to the scores (sdpa's mask, eager biases).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from passes.graph import aten
from passes.rewrite.buckets import BucketCost, Buckets, choose_granularity, round_up
from passes.rewrite.emit import PAD, Emitter
from passes.rewrite.replay import heads_of, split_heads
from passes.rewrite.uniform import emit_uniform, uniform_plan
from passes.structure import AttentionBlock


@dataclass(frozen=True)
class HeadLayout:
    """Kept query units of one head (or key/value group): rotary pairs and other dims."""

    pairs: tuple[int, ...]
    dims: tuple[int, ...]

    def query(self, block: AttentionBlock, wp: int, ws: int) -> list[int]:
        """Head dims in compact order, PAD where padded: rotary part, then the other dims."""
        rotary = block.compact_pairs(self.pairs, wp)
        return rotary + list(self.dims) + [PAD] * (ws - len(self.dims))


@dataclass(frozen=True)
class Bucket:
    """One bucket of heads as the features' emit hooks see it: its position ``index``, the
    query ``heads`` and key/value ``groups`` it holds, their layouts (``q_layouts`` one per
    query head, ``k_layouts`` one per group) and padded widths: ``wp`` rotary pairs and
    ``ws`` other query dims (a query head is ``width`` = 2 wp + ws wide), ``wv`` value dims."""

    block: AttentionBlock
    index: int
    heads: list[int]
    groups: list[int]
    q_layouts: list[HeadLayout]
    k_layouts: list[HeadLayout]
    wp: int
    ws: int
    wv: int

    @property
    def width(self) -> int:
        return 2 * self.wp + self.ws


def _layout(block: AttentionBlock, qdims: torch.Tensor) -> HeadLayout:
    pairs = block.rotary_dims // 2
    kept = [u for u in range(block.query_units_per_head) if bool(qdims[block.unit_dims(u)[0]])]
    return HeadLayout(
        tuple(u for u in kept if u < pairs),
        tuple(block.unit_dims(u)[0] for u in kept if u >= pairs),
    )


def _offset(dims: list[int], base: int) -> list[int]:
    return [PAD if d == PAD else base + d for d in dims]


def rewrite_attention(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    block: AttentionBlock,
    masks: dict[str, torch.Tensor],
    bucket: int | str,
    merge: bool,
    cost: BucketCost | None,
) -> dict:
    """Replace ``block`` by its compact form; returns the kept heads and the bucket
    granularity for the record: ``bucket``, or with a ``cost`` (``bucket="auto"``) the
    granularity whose attention calls it prices cheapest (:mod:`passes.rewrite.buckets`)."""
    qdims, vdims, live = block.per_head(masks)
    out_node = nodes[block.o.node]
    emit = Emitter(gm, block.name, out_node)
    x_q, x_kv = nodes[block.q.input], nodes[block.k.input]
    o_bias = block.o.linear_bias(gm)
    plan = uniform_plan(nodes, block)
    uniform = [h for h in range(block.num_heads) if plan and live[h] and not qdims[h].any()]
    heads_kept = [
        {"head": h, "query": int(qdims[h].sum()), "value": int(vdims[h].sum())}
        | ({"query_less_mean": True} if h in uniform else {})
        for h in range(block.num_heads)
        if live[h]
    ]
    if not live.any():
        out_node.replace_all_uses_with(emit.constant_output(x_q, o_bias, block.o.out_features))
        return {"heads": heads_kept, "bucket": None}
    d, g = block.head_dim, block.group_size
    layouts = {h: _layout(block, qdims[h]) for h in range(block.num_heads) if live[h]}
    rep: dict[int, int] = {}  # a live query head of each group: all of them share its units
    for h in layouts:
        rep.setdefault(h // g, h)
    scored = {h: lay for h, lay in layouts.items() if h not in uniform}

    def buckets_at(step: int) -> Buckets:
        return _buckets(block, scored, vdims, step)

    granularity = (
        int(bucket)
        if cost is None
        else choose_granularity(block.q.in_features, d, buckets_at, cost)
    )
    buckets = []
    index: dict[str, list[list[int]]] = {"q": [], "k": [], "v": []}
    for b, ((wp, ws, wv), heads) in enumerate(buckets_at(granularity).items()):
        groups = sorted({h // g for h in heads})
        buckets.append(
            Bucket(
                block,
                b,
                heads,
                groups,
                [layouts[h] for h in heads],
                [layouts[rep[grp]] for grp in groups],
                wp,
                ws,
                wv,
            )
        )
        index["q"].append(
            [i for h in heads for i in _offset(layouts[h].query(block, wp, ws), h * d)]
        )
        index["k"].append(
            [i for grp in groups for i in _offset(layouts[rep[grp]].query(block, wp, ws), grp * d)]
        )
        index["v"].append(
            [i for grp in groups for i in _offset(_dims(vdims[rep[grp]], wv), grp * d)]
        )
    if uniform:
        index["u"] = [_uniform_index(block, vdims, uniform, rep)]
    pieces = None
    for feature in block.features:
        pieces = pieces or feature.project(emit, nodes, block, index, x_q, x_kv)
    if pieces is None:
        pieces = _project(emit, block, index, x_q, x_kv, merge)
    biases = [bias for f in block.features for bias in f.sdpa_biases(nodes)]
    contexts, o_index = [], []
    for bk in buckets:
        q = split_heads(emit, pieces["q"][bk.index], len(bk.heads), bk.width)
        k = split_heads(emit, pieces["k"][bk.index], len(bk.groups), bk.width)
        v = split_heads(emit, pieces["v"][bk.index], len(bk.groups), bk.wv)
        for feature in block.features:
            q, k = feature.emit_qk(emit, nodes, bk, q, k)
        for feature in block.features:
            k, v = feature.emit_kv(emit, nodes, bk, k, v)
        terms: dict[fx.Node, fx.Node] = {}
        for feature in block.features:
            terms.update(feature.emit_terms(emit, nodes, bk, pieces, q, k))
        ctx = None
        for feature in block.features:
            ctx = ctx or feature.emit_context(emit, nodes, bk, (q, k, v), terms)
        if ctx is None:
            ctx = emit.call(
                aten.scaled_dot_product_attention.default,
                q,
                k,
                v,
                _bucket_mask(emit, biases, block, bk.heads, bk.index),
                0.0,
                block.is_causal,
                scale=block.scale,
            )
        contexts.append(
            emit.call(aten.flatten.using_ints, emit.call(aten.transpose.int, ctx, 1, 2), -2, -1)
        )
        o_index += [i for h in bk.heads for i in _offset(_dims(vdims[h], bk.wv), h * d)]
    if uniform:
        assert plan is not None  # heads are uniform only under a plan
        v_u = _uniform_values(emit, block, vdims, uniform, pieces["u"][0])
        contexts.append(emit_uniform(emit, nodes, plan, v_u, x_q))
        o_index += [h * block.head_dim + j for h in uniform for j in _dims(vdims[h], 0)]
    ctx = contexts[0] if len(contexts) == 1 else emit.call(aten.cat.default, contexts, -1)
    w_t, _ = emit.padded("o", block.o.linear_weight(gm).t(), None, o_index)
    w_o = emit.call(aten.t.default, w_t)
    b_o = emit.tensor("o_bias", o_bias, True) if o_bias is not None else None
    out_node.replace_all_uses_with(emit.call(aten.linear.default, ctx, w_o, b_o))
    return {"heads": heads_kept, "bucket": granularity if buckets else None}


def _buckets(
    block: AttentionBlock, layouts: dict[int, HeadLayout], vdims: torch.Tensor, step: int
) -> Buckets:
    """The heads of ``layouts`` grouped by query and value size rounded up to ``step``."""
    d = block.head_dim
    by_width: defaultdict[tuple[int, int, int], list[int]] = defaultdict(list)
    for h, lay in layouts.items():
        wp = round_up(len(lay.pairs), step, block.rotary_dims // 2)
        ws = round_up(len(lay.dims), step, d - block.rotary_dims)
        if wp + ws == 0:
            ws = 1  # no query units: a zero query, uniform attention
        by_width[(wp, ws, round_up(int(vdims[h].sum()), step, d))].append(h)
    return dict(sorted(by_width.items()))


def _uniform_index(
    block: AttentionBlock, vdims: torch.Tensor, uniform: list[int], rep: dict[int, int]
) -> list[int]:
    """Rows of W_V for the heads without query units: each key/value group's kept value
    dims once, groups in order (their values are averaged side by side)."""
    d, g = block.head_dim, block.group_size
    groups = sorted({h // g for h in uniform})
    return [grp * d + j for grp in groups for j in _dims(vdims[rep[grp]], 0)]


def _uniform_values(
    emit: Emitter, block: AttentionBlock, vdims: torch.Tensor, uniform: list[int], v: fx.Node
) -> fx.Node:
    """The values of :func:`_uniform_index` (batch, keys, dims) repeated to one block of
    columns per query head where several query heads of a group read them."""
    g = block.group_size
    groups = sorted({h // g for h in uniform})
    start, size = {}, 0
    for grp in groups:
        start[grp] = size
        size += int(vdims[grp * g : (grp + 1) * g].any(dim=0).sum())
    columns = [start[h // g] + i for h in uniform for i in range(int(vdims[h].sum()))]
    if columns == list(range(size)):
        return v
    select = emit.tensor("query_less_v", torch.tensor(columns), False)
    return emit.call(aten.index_select.default, v, -1, select)


def _dims(mask_row: torch.Tensor, width: int) -> list[int]:
    dims = [int(j) for j in torch.nonzero(mask_row).flatten()]
    return dims + [PAD] * (width - len(dims))


def _project(
    emit: Emitter,
    block: AttentionBlock,
    index: dict[str, list[list[int]]],
    x_q: fx.Node,
    x_kv: fx.Node,
    merge: bool,
) -> dict[str, list[fx.Node]]:
    """Emit the Q, K and V projections; return their per-bucket pieces."""
    projections = {"q": (block.q, x_q), "k": (block.k, x_kv), "v": (block.v, x_kv)}
    if "u" in index:  # the values of heads without query units (see rewrite.uniform)
        projections["u"] = (block.v, x_kv)
    groups: list[list[str]] = []
    for role, (proj, x) in projections.items():
        same = [
            grp
            for grp in groups
            if projections[grp[0]][1] is x
            and (projections[grp[0]][0].bias is None) == (proj.bias is None)
        ]
        if merge and same:
            same[0].append(role)
        else:
            groups.append([role])
    pieces: dict[str, list[fx.Node]] = {}
    for group in groups:
        weights, biases, flat_index, sizes, offset = [], [], [], [], 0
        for role in group:
            proj = projections[role][0]
            weights.append(proj.linear_weight(emit.gm))
            biases.append(proj.linear_bias(emit.gm))
            for part in index[role]:
                flat_index += [PAD if i == PAD else i + offset for i in part]
                sizes.append(len(part))
            offset += proj.out_features
        if not flat_index:  # every head of these roles runs elsewhere (see rewrite.uniform)
            pieces.update({role: [] for role in group})
            continue
        weight = torch.cat(weights)
        # merged projections all have a bias or none (see ``same`` above)
        bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
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


def _bucket_mask(
    emit: Emitter, biases: list[fx.Node], block: AttentionBlock, heads: list[int], bucket: int
) -> fx.Node | None:
    """The sum of ``biases``, each sliced to ``heads`` where it has one entry per head."""
    mask = None
    for bias in biases:
        tag = f"_{bias.name}" if len(biases) > 1 else ""
        sliced = heads_of(emit, bias, block.num_heads, heads, bucket, tag)
        mask = sliced if mask is None else emit.call(aten.add.Tensor, mask, sliced)
    return mask
