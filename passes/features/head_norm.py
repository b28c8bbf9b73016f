"""A norm over the query/key head dims between projection and scores (Qwen3, Gemma 3).

Discover: :func:`match_head_norm`, a norm region over the last dim of a query or key operand
(:func:`passes.discover.head_norm.norm_region`) that normalizes each head on its own (a norm
over the whole projection, OLMo 2's, is refused). Units: removing one query/key dim would
change the norm of the others, so the block offers no query units; the norm's weights stay
while any head does. Rewrite: the model's own norm nodes are replayed on each bucket's
queries and keys (they only reduce over the last dim, so any head layout works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from torch import fx

from passes.discover.head_norm import is_param, norm_region
from passes.errors import UnsupportedArchitectureError
from passes.features import AttentionFeature, OperandRecognizer, Traced
from passes.graph import attr_tensor, module_label, shape
from passes.rewrite.replay import replay

if TYPE_CHECKING:
    from passes.rewrite.attention import Bucket
    from passes.rewrite.emit import Emitter
    from passes.structure import AttentionBlock


@dataclass(frozen=True)
class HeadNorm:
    """A norm over the head dims between a projection and the scores (Qwen3, Gemma 3).

    ``region`` names the graph nodes from ``source`` (exclusive) to ``output`` in graph order;
    it only reduces over the last dim, so the rewrite replays it on any head layout.
    ``params`` counts its weights: they go with the block when no head is left.
    """

    source: str
    output: str
    region: tuple[str, ...]
    params: int = 0


def match_head_norm(node: fx.Node) -> tuple[HeadNorm, fx.Node] | None:
    """A norm over the head dims ending at ``node``: (head norm, the operand it reads)."""
    found = norm_region(node)
    if found is None:
        return None
    source, region = found
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    region = sorted(region, key=order.__getitem__)
    weights = {a for n in region for a in n.all_input_nodes if is_param(a)}
    gm = node.graph.owning_module
    assert gm is not None  # discover runs on a GraphModule's graph
    params = sum(attr_tensor(gm, w).numel() for w in weights)
    return HeadNorm(source.name, node.name, tuple(n.name for n in region), params), source


def _match(node: fx.Node, role: str, heads: int, head_dim: int) -> tuple[HeadNorm, fx.Node] | None:
    found = match_head_norm(node)
    if found is None:
        return None
    dims = shape(node)
    if dims is None or dims[-1] != head_dim:
        raise UnsupportedArchitectureError(
            f"the {role} of attention at {module_label(node)} is normed over the whole "
            f"projection ({dims[-1] if dims else '?'} features, OLMo 2 "
            f"style), not per head: removing any query/key dim or head would change "
            f"the norm of the others; grainfx prunes norms over the head dims only"
        )
    return found


#: A norm over the head dims of queries or keys, matched after layout ops and scales.
OPERAND = OperandRecognizer("norm", frozenset({"query", "key"}), False, _match)


@dataclass(frozen=True)
class HeadNorms(AttentionFeature):
    """Norms over the head dims of a block's queries (``q``) and/or keys (``k``)."""

    q: HeadNorm | None
    k: HeadNorm | None

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> HeadNorms | None:
        q, k = traced.query.found.get("norm"), traced.key.found.get("norm")
        return None if q is None and k is None else cls(q, k)

    def offers_query_units(self) -> bool:
        return False

    def fixed_params(self) -> int:
        return sum(n.params for n in (self.q, self.k) if n is not None)

    def note(self, block: AttentionBlock) -> str | None:
        norm = self.q or self.k
        assert norm is not None  # find makes one with a norm at least
        return (
            f"query units not offered: a norm over the query/key head dims "
            f"(at {norm.output}) makes removing one inexact"
        )

    def emit_qk(
        self, emit: Emitter, nodes: Mapping[str, fx.Node], bucket: Bucket, q: fx.Node, k: fx.Node
    ) -> tuple[fx.Node, fx.Node]:
        if self.q is not None:
            q = replay(emit, nodes, self.q.source, self.q.region, q)
        if self.k is not None:
            k = replay(emit, nodes, self.k.source, self.k.region, k)
        return q, k
