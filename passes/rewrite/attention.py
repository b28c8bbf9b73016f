"""Rewrite of attention blocks into buckets of heads of equal (padded) size.

The subgraph from the Q/K/V projections to the output projection is replaced: kept query and
value dims gathered per head, heads without value units dropped, one
``scaled_dot_product_attention`` per bucket with the original scale and masks / position
biases. Heads with value units but no query units attend uniformly: where the mask shows
that (see :mod:`passes.rewrite.uniform`) they are the mean of their values, without scores,
else a bucket with a zero query. Under RoPE the kept rotary pairs keep their pairing in the
compact layout (rotate-half: all first halves, then all second halves; interleaved: pair by
pair) and the cos/sin tables are gathered to match, so positions stay exact at every
length. Under GQA a bucket holds whole key/value groups: keys and values are projected once
per group and repeated to the bucket's query heads. A norm over the head dims is replayed
from the model's own nodes.

Disentangled relative-position terms (DeBERTa) are computed per bucket from the kept rows of
their position projections, which read the compact W_Q / W_K themselves where the model
shares them, and the model's own ops from there to the scores are replayed.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from passes.graph import aten, shape
from passes.rewrite.buckets import BucketCost, Buckets, choose_granularity, round_up
from passes.rewrite.emit import PAD, Emitter
from passes.rewrite.uniform import emit_uniform, uniform_plan
from passes.structure import AttentionBlock, Rope


@dataclass(frozen=True)
class _HeadLayout:
    """Kept query units of one head (or key/value group): rotary pairs and other dims."""

    pairs: tuple[int, ...]
    dims: tuple[int, ...]

    def query(self, block: AttentionBlock, wp: int, ws: int) -> list[int]:
        """Head dims in compact order, PAD where padded: rotary part, then the other dims."""
        rope = block.rope
        pad_pairs = [PAD] * (wp - len(self.pairs))
        if rope is None or not wp:
            rotary = []
        elif rope.layout == "half":
            rotary = (
                [rope.pair_dims(p)[0] for p in self.pairs]
                + pad_pairs
                + [rope.pair_dims(p)[1] for p in self.pairs]
                + pad_pairs
            )
        else:
            rotary = [d for p in self.pairs for d in rope.pair_dims(p)] + pad_pairs * 2
        return rotary + list(self.dims) + [PAD] * (ws - len(self.dims))

    def table(self, block: AttentionBlock, wp: int) -> list[int]:
        """Entries of the cos/sin tables for the rotary part of :meth:`query` (0 at PAD)."""
        return [0 if d == PAD else d for d in self.query(block, wp, 0)[: 2 * wp]]


def _layout(block: AttentionBlock, qdims: torch.Tensor) -> _HeadLayout:
    pairs = block.rotary_dims // 2
    kept = [u for u in range(block.query_units_per_head) if bool(qdims[block.unit_dims(u)[0]])]
    return _HeadLayout(
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
    # relative-position terms add scores of their own: those heads keep the sdpa path
    plan = None if block.relative else uniform_plan(nodes, block)
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
    buckets = buckets_at(granularity)
    index: dict[str, list[list[int]]] = {"q": [], "k": [], "v": []}
    groups_of = []
    for (wp, ws, wv), heads in buckets.items():
        groups = sorted({h // g for h in heads})
        groups_of.append(groups)
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
    pieces = (
        _project_relative(emit, nodes, block, index, x_q, x_kv)
        if block.relative
        else _project(emit, block, index, x_q, x_kv, merge)
    )
    biases = _score_biases(nodes, block)
    contexts, o_index = [], []
    for b, ((wp, ws, wv), heads) in enumerate(buckets.items()):
        groups = groups_of[b]
        q = _heads(emit, pieces["q"][b], len(heads), 2 * wp + ws)
        k = _heads(emit, pieces["k"][b], len(groups), 2 * wp + ws)
        v = _heads(emit, pieces["v"][b], len(groups), wv)
        if block.q_norm is not None:
            q = _replay(emit, nodes, block.q_norm.source, block.q_norm.region, q)
        if block.k_norm is not None:
            k = _replay(emit, nodes, block.k_norm.source, block.k_norm.region, k)
        if wp:
            assert block.rope is not None and block.rope_k is not None  # wp > 0 only under RoPE
            q_table = [i for h in heads for i in layouts[h].table(block, wp)]
            k_table = [i for grp in groups for i in layouts[rep[grp]].table(block, wp)]
            q = _rotate(emit, nodes, block.rope, q, q_table, wp, 2 * wp + ws)
            k = _rotate(emit, nodes, block.rope_k, k, k_table, wp, 2 * wp + ws)
        to_group = [groups.index(h // g) for h in heads]
        if to_group != list(range(len(groups))):
            select = emit.tensor(f"bucket{b}_kv", torch.tensor(to_group), False)
            k = emit.call(aten.index_select.default, k, 1, select)
            v = emit.call(aten.index_select.default, v, 1, select)
        if block.score_ops:
            terms = (
                _relative_terms(emit, nodes, block, pieces, (q, k), heads, b, 2 * wp + ws)
                if block.relative
                else None
            )
            ctx = _replay_scores(emit, nodes, block, q, k, v, heads, b, terms)
        else:
            ctx = emit.call(
                aten.scaled_dot_product_attention.default,
                q,
                k,
                v,
                _bucket_mask(emit, biases, block, heads, b),
                0.0,
                block.is_causal,
                scale=block.scale,
            )
        contexts.append(
            emit.call(aten.flatten.using_ints, emit.call(aten.transpose.int, ctx, 1, 2), -2, -1)
        )
        o_index += [i for h in heads for i in _offset(_dims(vdims[h], wv), h * d)]
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
    block: AttentionBlock, layouts: dict[int, _HeadLayout], vdims: torch.Tensor, step: int
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


def _heads(emit: Emitter, piece: fx.Node, heads: int, width: int) -> fx.Node:
    """(batch, seq, heads * width) -> (batch, heads, seq, width)."""
    return emit.call(
        aten.transpose.int, emit.call(aten.unflatten.int, piece, -1, [heads, width]), 1, 2
    )


def _replay(
    emit: Emitter, nodes: dict[str, fx.Node], source: str, region: tuple[str, ...], x: fx.Node
) -> fx.Node:
    """The model's own nodes ``region`` (a norm over the last dim) applied to ``x``."""
    env = {nodes[source]: x}
    out = x
    with emit.graph.inserting_before(emit.anchor):
        for name in region:
            out = emit.graph.node_copy(nodes[name], lambda n: env.get(n, n))
            env[nodes[name]] = out
    return out


def _replay_scores(
    emit: Emitter,
    nodes: dict[str, fx.Node],
    block: AttentionBlock,
    q: fx.Node,
    k: fx.Node,
    v: fx.Node,
    heads: list[int],
    bucket: int,
    known: dict[fx.Node, fx.Node] | None = None,
) -> fx.Node:
    """Attention of one bucket through the model's own score chain (``block.score_ops``):
    inputs of the chain with one entry per head are sliced to ``heads``; ``known`` maps
    inputs already computed for the bucket (relative-position terms) to their values."""
    scores = emit.call(aten.matmul.default, q, emit.call(aten.transpose.int, k, -2, -1))
    if block.scale != 1.0:
        scores = emit.call(aten.mul.Tensor, scores, block.scale)
    assert block.q_reader is not None  # eager blocks name the node that reads the scores
    env = {nodes[block.q_reader]: scores, **(known or {})}
    _replay_per_head(emit, nodes, block, block.score_ops, env, heads, bucket)
    return emit.call(aten.matmul.default, env[nodes[block.score_ops[-1]]], v)


def _replay_per_head(
    emit: Emitter,
    nodes: dict[str, fx.Node],
    block: AttentionBlock,
    names: tuple[str, ...],
    env: dict[fx.Node, fx.Node],
    heads: list[int],
    bucket: int,
) -> None:
    """Copies the model's nodes ``names`` into the compact graph for one bucket, into
    ``env``: inputs ``env`` already maps are read from it, other inputs with one entry per
    head are sliced to ``heads``."""

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            sliced = _heads_of(emit, node, block, heads, bucket, f"_{node.name}")
            assert sliced is not None  # a node in, a node out
            env[node] = sliced
        return env[node]

    with emit.graph.inserting_before(emit.anchor):
        for name in names:
            env[nodes[name]] = emit.graph.node_copy(nodes[name], arg)


def _relative_terms(
    emit: Emitter,
    nodes: dict[str, fx.Node],
    block: AttentionBlock,
    pieces: dict[str, list[fx.Node]],
    qk: tuple[fx.Node, fx.Node],
    heads: list[int],
    bucket: int,
    width: int,
) -> dict[fx.Node, fx.Node]:
    """The relative-position terms of one bucket (``block.relative``): its queries or keys
    times its piece of the position projections, then the model's own ops up to the sum
    added to the scores (``block.relative_ops``), inputs with one entry per head sliced to
    ``heads``. Returns ``{model node: bucket node}`` for that sum."""
    env: dict[fx.Node, fx.Node] = {}
    for i, term in enumerate(block.relative):
        pos = _heads(emit, pieces[f"rel{i}"][bucket], len(heads), width)
        content = qk[0] if term.content == "q" else qk[1]
        env[nodes[term.matmul]] = emit.call(
            aten.matmul.default, content, emit.call(aten.transpose.int, pos, -1, -2)
        )
    _replay_per_head(emit, nodes, block, block.relative_ops, env, heads, bucket)
    last = nodes[block.relative_ops[-1]]
    return {last: env[last]}


def _project_relative(
    emit: Emitter,
    nodes: dict[str, fx.Node],
    block: AttentionBlock,
    index: dict[str, list[list[int]]],
    x_q: fx.Node,
    x_kv: fx.Node,
) -> dict[str, list[fx.Node]]:
    """The Q, K and V projections one by one, and the position projections of the relative
    terms (``rel0``, ...), per bucket. A position projection with W_K's (W_Q's) rows reads
    the compact key (query) weights themselves: its kept rows are those of the keys (queries)
    it pairs with, and they are stored once."""
    sources = {"q": (block.q, x_q, index["q"]), "k": (block.k, x_kv, index["k"])}
    sources["v"] = (block.v, x_kv, index["v"])
    for i, term in enumerate(block.relative):
        paired = index["k"] if term.content == "q" else index["q"]
        sources[f"rel{i}"] = (term.projection, nodes[term.projection.input], paired)
    weights: dict[tuple, tuple[fx.Node, fx.Node | None]] = {}
    pieces: dict[str, list[fx.Node]] = {}
    for role, (proj, x, parts) in sources.items():
        flat = [i for part in parts for i in part]
        key = (proj.weight, tuple(proj.output_rows()), tuple(flat))
        if key not in weights:
            bias = proj.linear_bias(emit.gm)
            weights[key] = emit.padded(role, proj.linear_weight(emit.gm), bias, flat)
        y = emit.call(aten.linear.default, x, *weights[key])
        if len(parts) == 1:
            pieces[role] = [y]
            continue
        split = emit.call(aten.split_with_sizes.default, y, [len(p) for p in parts], -1)
        pieces[role] = [emit.call(operator.getitem, split, i) for i in range(len(parts))]
    return pieces


def _rotate(
    emit: Emitter,
    nodes: dict[str, fx.Node],
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


def _score_biases(nodes: dict[str, fx.Node], block: AttentionBlock) -> list[fx.Node]:
    """What is added to the scores: sdpa's mask, or the biases of canonical eager scores."""
    if block.kind == "sdpa":
        return [nodes[block.attn_mask]] if block.attn_mask else []
    return [nodes[name] for name in block.score_biases]


def _bucket_mask(
    emit: Emitter, biases: list[fx.Node], block: AttentionBlock, heads: list[int], bucket: int
) -> fx.Node | None:
    """The sum of ``biases``, each sliced to ``heads`` where it has one entry per head."""
    mask = None
    for bias in biases:
        tag = f"_{bias.name}" if len(biases) > 1 else ""
        sliced = _heads_of(emit, bias, block, heads, bucket, tag)
        mask = sliced if mask is None else emit.call(aten.add.Tensor, mask, sliced)
    return mask


def _heads_of(
    emit: Emitter,
    mask: fx.Node | None,
    block: AttentionBlock,
    heads: list[int],
    bucket: int,
    tag: str = "",
) -> fx.Node | None:
    """The mask's slice for ``heads`` when it has one entry per head, else the mask itself."""
    if mask is None:
        return None
    dims = shape(mask)
    per_head = dims is not None and len(dims) == 4 and dims[1] == block.num_heads > 1
    if not per_head or heads == list(range(block.num_heads)):
        return mask
    index = emit.tensor(f"bucket{bucket}{tag}_heads", torch.tensor(heads), False)
    return emit.call(aten.index_select.default, mask, 1, index)
