"""What sits between the two products of attention: sdpa's mask, additive biases of eager
scores, or an eager score chain replayed op by op.

Discover: the chain itself is found by :mod:`passes.discover.scores` (the core's eager
attention); a *canonical* chain (a scale, additive biases, casts) becomes
:class:`ScoreBiases` and runs as one ``scaled_dot_product_attention`` per bucket, like
sdpa's mask (:class:`SdpaMask`); any other chain (soft-capping, ``where`` masks,
relative-position terms) becomes :class:`ScoreReplay`: the model's own nodes from the score
matmul to the context matmul, replayed per bucket of heads with their per-head inputs
sliced. Units: none. A block without any of these (sdpa without a mask, eager scores with a
scale only) has no score feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from torch import fx

from passes.features import AttentionFeature, Traced
from passes.graph import PASSTHROUGH_OPS, aten, is_op, shape
from passes.rewrite.replay import replay_per_head

if TYPE_CHECKING:
    from passes.rewrite.attention import Bucket
    from passes.rewrite.emit import Emitter
    from passes.structure import AttentionBlock


@dataclass(frozen=True)
class SdpaMask(AttentionFeature):
    """The mask given to ``scaled_dot_product_attention`` (a node name)."""

    mask: str

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> SdpaMask | None:
        if traced.chain is not None:
            return None
        node = traced.where
        args: list[Any] = list(node.args) + [None] * (6 - len(node.args))
        mask = args[3] if args[3] is not None else node.kwargs.get("attn_mask")
        return cls(mask.name) if isinstance(mask, fx.Node) else None

    def score_inputs(
        self, block: AttentionBlock, nodes: Mapping[str, fx.Node]
    ) -> list[tuple[fx.Node, fx.Node]]:
        return [(nodes[block.op], nodes[self.mask])]

    def uniform_biases(
        self, nodes: Mapping[str, fx.Node], block: AttentionBlock
    ) -> tuple[str, ...] | None:
        return (self.mask,)

    def sdpa_biases(self, nodes: Mapping[str, fx.Node]) -> list[fx.Node]:
        return [nodes[self.mask]]


@dataclass(frozen=True)
class ScoreBiases(AttentionFeature):
    """Tensors added to canonical eager scores after the scale (node names)."""

    biases: tuple[str, ...]

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> ScoreBiases | None:
        chain = traced.chain
        if chain is None or not chain.canonical or _replayed(found) or not chain.biases:
            return None
        return cls(chain.biases)

    def score_inputs(
        self, block: AttentionBlock, nodes: Mapping[str, fx.Node]
    ) -> list[tuple[fx.Node, fx.Node]]:
        add = {nodes[name] for name in self.biases}
        return [(user, bias) for bias in add for user in bias.users]

    def uniform_biases(
        self, nodes: Mapping[str, fx.Node], block: AttentionBlock
    ) -> tuple[str, ...] | None:
        return self.biases

    def sdpa_biases(self, nodes: Mapping[str, fx.Node]) -> list[fx.Node]:
        return [nodes[name] for name in self.biases]


def _replayed(found: tuple[AttentionFeature, ...]) -> bool:
    """True when a feature found so far adds to the scores itself (relative terms)."""
    return any(f.adds_score_terms() for f in found)


@dataclass(frozen=True)
class ScoreReplay(AttentionFeature):
    """The nodes from the score matmul to the context matmul, in graph order, replayed by
    the rewrite; the block's ``scale`` then only holds the factors applied to q and k."""

    ops: tuple[str, ...]

    @classmethod
    def find(cls, traced: Traced, found: tuple[AttentionFeature, ...] = ()) -> ScoreReplay | None:
        chain = traced.chain
        if chain is None or (chain.canonical and not _replayed(found)):
            return None
        return cls(tuple(n.name for n in chain.ops))

    def note(self, block: AttentionBlock) -> str | None:
        return (
            f"scores pass through {len(self.ops)} ops the compact model "
            f"replays per bucket of heads (no sdpa)"
        )

    def score_inputs(
        self, block: AttentionBlock, nodes: Mapping[str, fx.Node]
    ) -> list[tuple[fx.Node, fx.Node]]:
        assert block.q_reader is not None  # eager blocks name the node that reads the scores
        q_reader = nodes[block.q_reader]
        chain = {nodes[name] for name in self.ops} | {q_reader}
        return [(op, a) for op in chain - {q_reader} for a in op.all_input_nodes if a not in chain]

    def uniform_biases(
        self, nodes: Mapping[str, fx.Node], block: AttentionBlock
    ) -> tuple[str, ...] | None:
        biases = _chain_biases(nodes, block, self.ops)
        return None if biases is None else tuple(biases)

    def emit_context(
        self,
        emit: Emitter,
        nodes: Mapping[str, fx.Node],
        bucket: Bucket,
        qkv: tuple[fx.Node, fx.Node, fx.Node],
        terms: dict[fx.Node, fx.Node],
    ) -> fx.Node | None:
        """Attention of one bucket through the model's own score chain: inputs of the chain
        with one entry per head are sliced to the bucket's heads; ``terms`` maps inputs
        already computed for the bucket (relative-position terms) to their values."""
        block = bucket.block
        q, k, v = qkv
        scores = emit.call(aten.matmul.default, q, emit.call(aten.transpose.int, k, -2, -1))
        if block.scale != 1.0:
            scores = emit.call(aten.mul.Tensor, scores, block.scale)
        assert block.q_reader is not None  # eager blocks name the node that reads the scores
        env = {nodes[block.q_reader]: scores, **terms}
        replay_per_head(emit, nodes, block.num_heads, self.ops, env, bucket.heads, bucket.index)
        return emit.call(aten.matmul.default, env[nodes[self.ops[-1]]], v)


#: Ops that keep a zero score zero: ``op(0, c) == 0`` for a finite constant ``c`` (non-zero
#: for a division); soft-capping is ``tanh(s / c) * c``.
_ZERO_KEEPING = {
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.mul_.Tensor,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.div_.Tensor,
    aten.tanh.default,
}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}


def _chain_biases(
    nodes: Mapping[str, fx.Node], block: AttentionBlock, ops: tuple[str, ...]
) -> list[str] | None:
    """The tensors added to the scores of a replayed chain (``ops``) when the
    chain maps a zero score to zero before adding them (scales, soft-capping, casts), then
    the softmax over the keys, then casts or an eval-mode dropout; else None."""
    assert block.q_reader is not None  # eager blocks name the score matmul
    prev, seen_softmax = nodes[block.q_reader], False
    biases: list[str] = []
    for name in ops:
        node = nodes[name]
        others = [a for a in node.args if a is not prev]
        if len(others) == len(node.args):
            return None  # not reading the scores (discover chains them, but check)
        if is_op(node, PASSTHROUGH_OPS - {aten.dropout.default}):
            if biases and not seen_softmax:
                return None  # a cast of the masked value (to -inf in half precision)
        elif is_op(node, [aten.dropout.default]):
            if not seen_softmax or (len(node.args) > 2 and node.args[2]):
                return None
        elif seen_softmax:
            return None
        elif is_op(node, _SOFTMAX):
            dims = shape(node)
            if dims is None or node.args[1] not in (-1, len(dims) - 1):
                return None
            seen_softmax = True
        elif is_op(node, _ZERO_KEEPING) and not biases:
            constants = others[:1] if node.target is not aten.tanh.default else []
            if node.target is not aten.tanh.default and not (
                len(constants) == 1
                and isinstance(constants[0], (int, float))
                and math.isfinite(constants[0])
                and (constants[0] != 0 or not is_op(node, [aten.div.Tensor, aten.div_.Tensor]))
                and (node.args[0] is prev or is_op(node, [aten.mul.Tensor, aten.mul_.Tensor]))
            ):
                return None
        elif is_op(node, [aten.add.Tensor, aten.add_.Tensor]) and isinstance(others[0], fx.Node):
            biases.append(others[0].name)
        else:
            return None
        prev = node
    return biases if seen_softmax else None
