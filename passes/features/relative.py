"""Disentangled relative-position terms of the scores (DeBERTa's content-to-position and
position-to-content).

Discover: products of the block's queries or keys with projected position embeddings that
the score chain adds (through transposes, gathers along positions and elementwise ops).
Units: query unit (h, j) spans both uses of W_Q and W_K: row j of head h in the content and
the position projections alike, so removing it removes dim j from every term exactly;
position projections with weights of their own are covered by the query units. Instrument:
the query mask goes into every term. Rewrite: the terms are computed per bucket from the
kept rows of their position projections, which read the compact W_Q / W_K themselves where
the model shares them, and the model's own ops from there to the scores are replayed (the
score chain is then replayed too, :class:`passes.features.scores.ScoreReplay`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from torch import fx

from passes.discover.scores import MATMUL, elementwise
from passes.errors import DiscoverError, UnsupportedArchitectureError
from passes.features import AttentionFeature, Pieces, Traced
from passes.graph import Projection, arg_node, as_node, aten, is_op, module_label, shape
from passes.rewrite.replay import replay_per_head, split_heads

if TYPE_CHECKING:
    from passes.discover.operand import Operand
    from passes.rewrite.attention import Bucket
    from passes.rewrite.emit import Emitter
    from passes.structure import AttentionBlock


@dataclass(frozen=True)
class RelativeTerm:
    """A disentangled relative-position term of the scores (DeBERTa's content-to-position and
    position-to-content): per head, the block's queries (``content == "q"``) or keys
    (``"k"``) times relative position embeddings projected by ``projection`` (W_K's rows for
    queries, W_Q's for keys, or projections of their own), computed by ``matmul``;
    ``operand`` is the projected embeddings (1, heads, positions, head size) it reads.

    Query unit (h, j) spans both uses of W_Q and W_K: row j of head h in the content and the
    position projections alike, so removing it removes dim j from every term exactly.
    """

    content: str
    matmul: str
    operand: str
    projection: Projection


@dataclass(frozen=True)
class RelativeTerms(AttentionFeature):
    """The relative-position ``terms`` added to a block's scores, and ``ops``: the nodes from
    their matmuls to the sum that joins the scores (graph order, the matmuls left out),
    replayed per bucket of heads."""

    terms: tuple[RelativeTerm, ...]
    ops: tuple[str, ...]

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> RelativeTerms | None:
        if traced.chain is None:
            return None
        terms, ops = _relative_terms(traced)
        if not terms:
            return None
        if traced.key.heads != traced.heads:
            raise UnsupportedArchitectureError(
                f"attention at {module_label(traced.where)} adds relative-position terms and "
                f"shares key/value heads; grainfx prunes relative-position terms with one "
                f"key/value head per query head"
            )
        return cls(terms, ops)

    def projections(self, block: AttentionBlock) -> tuple[Projection, ...]:
        own = {block.q.weight, block.k.weight}
        found = {t.projection.weight: t.projection for t in self.terms}
        return tuple(p for w, p in found.items() if w not in own)

    def params_per_query_dim(self, block: AttentionBlock) -> int:
        return sum(p.params_per_output() for p in self.projections(block))

    def note(self, block: AttentionBlock) -> str | None:
        kinds = ", ".join(
            "content-to-position" if t.content == "q" else "position-to-content" for t in self.terms
        )
        return (
            f"{len(self.terms)} relative-position terms ({kinds}) reuse the "
            f"query/key projections on position embeddings: a query unit spans "
            f"both uses of its W_Q and W_K rows"
        )

    def query_mask_sites(self, block: AttentionBlock) -> tuple[tuple[str, str], ...]:
        """Content-to-position terms read the masked queries; position-to-content terms
        multiply their projected positions (W_Q's rows) by the mask."""
        return tuple(
            ("reader", t.matmul) if t.content == "q" else ("operand", t.operand) for t in self.terms
        )

    def uniform_biases(
        self, nodes: Mapping[str, fx.Node], block: AttentionBlock
    ) -> tuple[str, ...] | None:
        return None  # the terms add scores of their own: those heads keep the scores path

    def adds_score_terms(self) -> bool:
        return True

    def project(
        self,
        emit: Emitter,
        nodes: Mapping[str, fx.Node],
        block: AttentionBlock,
        index: dict[str, list[list[int]]],
        x_q: fx.Node,
        x_kv: fx.Node,
    ) -> Pieces | None:
        """The Q, K and V projections one by one, and the position projections of the
        terms (``rel0``, ...), per bucket. A position projection with W_K's (W_Q's) rows
        reads the compact key (query) weights themselves: its kept rows are those of the
        keys (queries) it pairs with, and they are stored once."""
        sources = {"q": (block.q, x_q, index["q"]), "k": (block.k, x_kv, index["k"])}
        sources["v"] = (block.v, x_kv, index["v"])
        for i, term in enumerate(self.terms):
            paired = index["k"] if term.content == "q" else index["q"]
            sources[f"rel{i}"] = (term.projection, nodes[term.projection.input], paired)
        weights: dict[tuple, tuple[fx.Node, fx.Node | None]] = {}
        pieces: Pieces = {}
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

    def emit_terms(
        self,
        emit: Emitter,
        nodes: Mapping[str, fx.Node],
        bucket: Bucket,
        pieces: Pieces,
        q: fx.Node,
        k: fx.Node,
    ) -> dict[fx.Node, fx.Node]:
        """The terms of one bucket: its queries or keys times its piece of the position
        projections, then the model's own ops up to the sum added to the scores, inputs with
        one entry per head sliced to the bucket's heads. Returns ``{model node: bucket
        node}`` for that sum."""
        env: dict[fx.Node, fx.Node] = {}
        heads = bucket.heads
        for i, term in enumerate(self.terms):
            pos = split_heads(emit, pieces[f"rel{i}"][bucket.index], len(heads), bucket.width)
            content = q if term.content == "q" else k
            env[nodes[term.matmul]] = emit.call(
                aten.matmul.default, content, emit.call(aten.transpose.int, pos, -1, -2)
            )
        num_heads = bucket.block.num_heads
        replay_per_head(emit, nodes, num_heads, self.ops, env, heads, bucket.index)
        last = nodes[self.ops[-1]]
        return {last: env[last]}


_RELATIVE_DEPTH = 16


def _term_ops(
    node: fx.Node, heads: int, ops: dict[fx.Node, bool], terms: list[fx.Node], depth: int
) -> bool:
    """True when ``node`` (one entry per head) is computed from score matmuls by transposes,
    gathers along positions and elementwise ops; records those matmuls in ``terms`` and
    whether each op visited leads to one in ``ops``."""
    if is_op(node, MATMUL):
        if node not in terms:
            terms.append(node)
        return True
    if node in ops:
        return ops[node]
    dims = shape(node)
    if depth == 0 or dims is None or len(dims) != 4 or dims[1] != heads:
        return False
    if is_op(node, [aten.transpose.int, aten.gather.default]):
        inputs = [arg_node(node, 0)]
    elif elementwise(node):
        inputs = node.all_input_nodes
    else:
        inputs = []
    found = [_term_ops(a, heads, ops, terms, depth - 1) for a in inputs]
    ops[node] = any(found)
    return ops[node]


def _relative_terms(traced: Traced) -> tuple[tuple[RelativeTerm, ...], tuple[str, ...]]:
    """Disentangled relative-position terms added to the scores of ``traced.chain``
    (DeBERTa): matmuls of the block's queries or keys with projected position embeddings,
    and the ops from them to the scores. ``((), ())`` where the scores add none."""
    chain = traced.chain
    assert chain is not None  # find looks at eager blocks only
    qo, ko, vo = traced.query, traced.key, traced.value
    heads = traced.heads
    inside = set(chain.ops) | {chain.matmul}
    ops: dict[fx.Node, bool] = {}
    terms: list[fx.Node] = []
    for op in chain.ops:
        for arg in op.all_input_nodes:
            if arg not in inside:
                _term_ops(arg, heads, ops, terms, _RELATIVE_DEPTH)
    found = []
    for matmul in terms:
        content, pos_t = (as_node(a) for a in matmul.args)
        role = _content_role(content, traced)
        pos = arg_node(pos_t, 0)
        dims = shape(pos)
        if (
            role is None
            or not is_op(pos_t, [aten.transpose.int, aten.permute.default])
            or dims is None
            or dims[0] != 1
        ):
            raise UnsupportedArchitectureError(
                f"attention scores at {module_label(chain.matmul)} add a product "
                f"{module_label(matmul)} that is not the queries or keys times transposed "
                f"position embeddings (batch 1); grainfx prunes relative-position terms of "
                f"that form (DeBERTa's content-to-position and position-to-content)"
            )
        po = traced.trace(pos, "key" if role == "q" else "query")
        owner = {qo.projection.weight: qo, ko.projection.weight: ko}.get(po.projection.weight)
        if (
            po.transformed
            or po.projection.weight == vo.projection.weight
            or (owner is not None and po.projection.output_rows() != owner.projection.output_rows())
        ):
            raise UnsupportedArchitectureError(
                f"the position embeddings of relative term {module_label(matmul)} are scaled, "
                f"rotated, normed, projected by W_V or by other rows of W_Q / W_K than the "
                f"content's; grainfx prunes relative-position terms whose position projection "
                f"has one row per query/key head dim"
            )
        found.append(RelativeTerm(role, matmul.name, pos.name, po.projection))
    order = {n: i for i, n in enumerate(chain.matmul.graph.nodes)}
    relative_ops = sorted((n for n, leads in ops.items() if leads), key=order.__getitem__)
    return tuple(found), tuple(n.name for n in relative_ops)


def _content_role(node: fx.Node, traced: Traced) -> str | None:
    """``"q"`` or ``"k"`` when ``node`` is the block's queries or keys straight from their
    projection (no scale, rotation or norm on the way), else None."""
    qo, ko = traced.query, traced.key
    if node is traced.q and not qo.transformed:
        return "q"
    try:
        found: Operand = traced.trace(node, "key")
    except DiscoverError:
        return None
    if found.transformed:
        return None
    if found.projection == ko.projection:
        return "k"
    return "q" if found.projection == qo.projection else None
