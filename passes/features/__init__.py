"""Attention features: what varies between attention blocks, one module per variant.

An :class:`~passes.structure.AttentionBlock` holds the common core of attention (projections,
heads, scale, causality, where the queries are read) and a tuple of *features*: rotary
positions (:mod:`.rope`), key/value heads shared by query heads (:mod:`.kv_repeat`), a norm
over the query/key head dims (:mod:`.head_norm`), disentangled relative-position terms
(:mod:`.relative`) and what sits between the two products of the scores (:mod:`.scores`:
sdpa's mask, additive biases of eager scores, or a score chain replayed op by op). Plain
attention (sdpa, no mask) has no feature at all.

Each feature module holds the whole variant, in three parts:

* **discover**: a recognizer of the operand ops it puts between a projection and the
  attention op (:class:`OperandRecognizer`, tried by :func:`passes.discover.operand.
  trace_operand`), and/or :meth:`AttentionFeature.find`, which builds the feature from what
  discover traced of one block (:class:`Traced`) or returns None;
* **units**: the hooks of :class:`AttentionFeature` that shape the prunable units and count
  their parameters (``kv_heads``, ``rotary_dims`` and ``unit_dims``, ``offers_query_units``,
  ``params_per_query_dim``, ``fixed_params``, ``projections``), the mask layout instrument
  inserts (``expand_query_mask``, ``query_mask_sites``) and a line for ``print(structure)``
  (``note``);
* **emit**: the rewrite hooks, called by :func:`passes.rewrite.attention.rewrite_attention`
  for each bucket of heads (``emit_qk`` on the bucket's queries and keys, ``emit_kv`` on its
  keys and values, ``emit_terms`` for terms added to the scores, ``emit_context`` for the
  attention itself) and once per block (``project``, ``uniform_biases``).

Every hook has a neutral default, so a feature implements only what it changes. Hooks run
in the order of ``block.features``, which is the order of :data:`passes.features.registry.
FEATURES` (the score chain last). Adding a variant is adding one module here, its entry in
the registry, and a row of the exactness table (``tests/models.py``).

What stays in the core: the head split and fused-projection splits (feature rows replayed
through layout ops, :func:`passes.graph.feature_rows`, need no variant), the group arithmetic
of GQA (``group_size`` is 1 without it), query units that are pairs of dims (the bucket
widths count rotary pairs and other dims apart) and the plain sdpa call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from torch import fx

if TYPE_CHECKING:
    from passes.discover.operand import Operand
    from passes.discover.scores import ScoreChain
    from passes.graph import Projection
    from passes.rewrite.attention import Bucket
    from passes.rewrite.emit import Emitter
    from passes.structure import AttentionBlock

#: ``{role: [their pieces, one per bucket]}`` of the projections a rewrite emitted.
Pieces = dict[str, list[fx.Node]]


@dataclass(frozen=True)
class OperandRecognizer:
    """A recognizer of ops between a projection and an attention operand.

    ``match(node, role, heads, head_dim)`` returns ``(what it found, the node it reads)`` or
    None; each recognizer matches at most once per operand, on the ``roles`` it names.
    ``early`` recognizers are tried before layout ops and scales are looked through (their
    ops may look like layout ops), the others after. ``transforms``: what it matches changes
    the values (a rotation, a norm), not only repeats heads.
    """

    key: str
    roles: frozenset[str]
    early: bool
    match: Callable[[fx.Node, str, int, int], tuple[Any, fx.Node] | None]
    transforms: bool = True


@dataclass(frozen=True)
class Traced:
    """What discover traced of one attention block, for :meth:`AttentionFeature.find`.

    ``where`` is the attention op (sdpa) or the softmax, ``q`` the query tensor it reads,
    ``chain`` the score chain of eager attention (None for sdpa); ``trace`` traces another
    operand back to its projection (``trace(node, role)``).
    """

    where: fx.Node
    q: fx.Node
    heads: int
    head_dim: int
    query: Operand
    key: Operand
    value: Operand
    chain: ScoreChain | None
    trace: Callable[[fx.Node, str], Operand]


class AttentionFeature:
    """Base of the attention features: every hook does nothing by default."""

    @classmethod
    def find(
        cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()
    ) -> AttentionFeature | None:
        """The feature in the block ``traced`` (``found``: the features found before it), or
        None where it has none."""
        return None

    # units ------------------------------------------------------------------------------

    def kv_heads(self) -> int | None:
        """Key/value heads, where fewer than query heads."""
        return None

    def rotary_dims(self) -> int:
        """Head dims that form query units in pairs (they rotate together)."""
        return 0

    def pair_dims(self, pair: int) -> tuple[int, int]:
        """The two head dims of pair ``pair`` (only where :meth:`rotary_dims` > 0)."""
        raise NotImplementedError

    def compact_pairs(self, pairs: tuple[int, ...], width: int) -> list[int]:
        """Head dims of the kept ``pairs`` in compact order, padded to ``width`` pairs with
        PAD (only where :meth:`rotary_dims` > 0)."""
        raise NotImplementedError

    def offers_query_units(self) -> bool:
        """False where removing one query/key dim would change the others (a norm)."""
        return True

    def params_per_query_dim(self, block: AttentionBlock) -> int:
        """Parameters of weights of the feature's own that go with each query dim."""
        return 0

    def fixed_params(self) -> int:
        """Parameters that stay while any head of the block does."""
        return 0

    def projections(self, block: AttentionBlock) -> tuple[Projection, ...]:
        """Projections of the feature's own whose rows the query units cover."""
        return ()

    def note(self, block: AttentionBlock) -> str | None:
        """What this feature changes about the block's units, for ``print(structure)``."""
        return None

    # instrument -------------------------------------------------------------------------

    def expand_query_mask(self, graph: fx.Graph, mask: fx.Node, block: AttentionBlock) -> fx.Node:
        """Graph ops that turn the (kv heads x query units) mask into head dims per unit."""
        return mask

    def query_mask_sites(self, block: AttentionBlock) -> tuple[tuple[str, str], ...]:
        """Where else the query mask goes: ``("reader", node)`` for a node that reads the
        queries (it reads the masked ones), ``("operand", node)`` for a (heads, seq, dims)
        tensor multiplied by the mask."""
        return ()

    def score_inputs(
        self, block: AttentionBlock, nodes: Mapping[str, fx.Node]
    ) -> list[tuple[fx.Node, fx.Node]]:
        """(consumer, input) edges through which tensors enter the scores."""
        return []

    # emit -------------------------------------------------------------------------------

    def uniform_biases(
        self, nodes: Mapping[str, fx.Node], block: AttentionBlock
    ) -> tuple[str, ...] | None:
        """Tensors this feature adds to the scores that a zero query sees, or None where a
        zero query does not attend uniformly (see :mod:`passes.rewrite.uniform`)."""
        return ()

    def project(
        self,
        emit: Emitter,
        nodes: Mapping[str, fx.Node],
        block: AttentionBlock,
        index: dict[str, list[list[int]]],
        x_q: fx.Node,
        x_kv: fx.Node,
    ) -> Pieces | None:
        """The Q, K and V projections (``index``: their rows per bucket), where this feature
        emits them itself; None: the core does."""
        return None

    def emit_qk(
        self, emit: Emitter, nodes: Mapping[str, fx.Node], bucket: Bucket, q: fx.Node, k: fx.Node
    ) -> tuple[fx.Node, fx.Node]:
        """The bucket's queries and keys (batch, heads, seq, width) after this feature."""
        return q, k

    def emit_kv(
        self, emit: Emitter, nodes: Mapping[str, fx.Node], bucket: Bucket, k: fx.Node, v: fx.Node
    ) -> tuple[fx.Node, fx.Node]:
        """The bucket's keys and values, brought to one head per query head."""
        return k, v

    def emit_terms(
        self,
        emit: Emitter,
        nodes: Mapping[str, fx.Node],
        bucket: Bucket,
        pieces: Pieces,
        q: fx.Node,
        k: fx.Node,
    ) -> dict[fx.Node, fx.Node]:
        """``{model node: bucket node}`` of terms this feature adds to the scores."""
        return {}

    def emit_context(
        self,
        emit: Emitter,
        nodes: Mapping[str, fx.Node],
        bucket: Bucket,
        qkv: tuple[fx.Node, fx.Node, fx.Node],
        terms: dict[fx.Node, fx.Node],
    ) -> fx.Node | None:
        """The bucket's attention (batch, heads, seq, value width), where this feature
        computes it; None: the core's ``scaled_dot_product_attention`` does."""
        return None

    def adds_score_terms(self) -> bool:
        """True where this feature adds terms of its own to the scores (the score chain is
        then replayed, not run as sdpa)."""
        return False

    def sdpa_biases(self, nodes: Mapping[str, fx.Node]) -> list[fx.Node]:
        """Tensors the core's sdpa call adds to the scores (summed, sliced per bucket)."""
        return []
