"""The shared vocabulary of the passes: attention and FFN blocks and their prunable units.

A prunable unit is a group of weight slices that go together:

* query unit (g, j): dimension j of the query/key heads of group g: the rows of W_Q (for every
  query head of a GQA group) and of W_K, with their biases (with RoPE, the rotated pair of dims);
* value unit (g, j): row j of value head g in W_V (+ bias) and the matching columns of W_O (for
  every query head that reads that value head);
* query head h (GQA only): the W_Q rows and W_O columns of one query head of a group;
* FFN unit i: row i of the up (and gate) projection (+ bias) and column i of the down projection.

Masks are named ``<block>.qk``, ``<block>.vo`` (shape: kv heads x units per head),
``<block>.heads`` (shape: query heads; GQA only) and ``<block>`` for FFN blocks (shape: width).
Under RoPE a query unit is a rotary pair of dims (pass-through dims of partial rotary are units
one by one); where a norm over the head dims sits between projection and scores there is no
``.qk`` mask. These variants are attention features (:mod:`passes.features`): each says
which slices its block's units take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, TypeVar, cast

import torch

from passes.graph import Projection

if TYPE_CHECKING:
    from passes.features import AttentionFeature
    from passes.features.head_norm import HeadNorm, HeadNorms
    from passes.features.relative import RelativeTerm, RelativeTerms
    from passes.features.rope import Rope, Rotary
    from passes.features.scores import ScoreBiases, ScoreReplay, SdpaMask


F = TypeVar("F", bound="AttentionFeature")


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block: the core of attention and the features that vary.

    ``kind`` is ``"sdpa"`` or ``"eager"`` (matmul-softmax-matmul); ``op`` names the sdpa node
    or the softmax. ``scale`` is the factor applied to q.k (with a replayed score chain, only
    the factors applied to q and k before the matmul). ``q_operand`` is the query tensor
    (batch, heads, seq, head_dim) that ``q_reader`` (the attention op or the score matmul)
    reads. ``features`` is what varies (:mod:`passes.features`), in hook order: key/value
    heads shared by query heads (GQA), norms over the head dims, rotary positions,
    relative-position terms and what sits between the two products of the scores (sdpa's
    mask, additive biases, a replayed chain). The units, masks and parameter counts below
    ask the features; the old fields (``rope``, ``score_ops``, ...) are read-only views of
    them.
    """

    name: str
    kind: str
    op: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    head_dim: int
    scale: float
    is_causal: bool = False
    q_operand: str | None = None
    q_reader: str | None = None
    features: tuple[AttentionFeature, ...] = ()

    def feature(self, kind: type[F]) -> F | None:
        """The feature of class ``kind`` this block has, or None."""
        return next((f for f in self.features if isinstance(f, kind)), None)

    @property
    def kv_heads(self) -> int:
        found = [n for f in self.features if (n := f.kv_heads()) is not None]
        return found[0] if found else self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 without GQA)."""
        return self.num_heads // self.kv_heads

    @property
    def has_query_units(self) -> bool:
        """False when a norm over the query/key dims makes removing one of them inexact."""
        return all(f.offers_query_units() for f in self.features)

    @property
    def has_head_units(self) -> bool:
        """Query heads are units of their own where several share a key/value head."""
        return self.group_size > 1

    @property
    def _pairing(self) -> AttentionFeature | None:
        """The feature whose query units are pairs of dims (RoPE), if any."""
        return next((f for f in self.features if f.rotary_dims()), None)

    @property
    def rotary_dims(self) -> int:
        pairing = self._pairing
        return pairing.rotary_dims() if pairing is not None else 0

    @property
    def query_units_per_head(self) -> int:
        """Rotary pairs, then pass-through dims (all dims one by one without RoPE)."""
        return self.rotary_dims // 2 + self.head_dim - self.rotary_dims

    def unit_dims(self, unit: int) -> tuple[int, ...]:
        """The head dims of query unit ``unit``: a rotary pair or one pass-through dim."""
        pairs = self.rotary_dims // 2
        if unit < pairs:
            pairing = self._pairing
            assert pairing is not None  # pairs > 0 only under RoPE
            return pairing.pair_dims(unit)
        return (self.rotary_dims + unit - pairs,)

    def compact_pairs(self, pairs: tuple[int, ...], width: int) -> list[int]:
        """Head dims of the kept rotary ``pairs`` in compact order, padded to ``width``."""
        pairing = self._pairing
        return pairing.compact_pairs(pairs, width) if pairing is not None and width else []

    def unit_of_dim(self) -> list[int]:
        """For each head dim, the query unit it belongs to."""
        owner = [0] * self.head_dim
        for unit in range(self.query_units_per_head):
            for dim in self.unit_dims(unit):
                owner[dim] = unit
        return owner

    @property
    def qk_shape(self) -> torch.Size:
        return torch.Size([self.kv_heads, self.query_units_per_head])

    @property
    def vo_shape(self) -> torch.Size:
        return torch.Size([self.kv_heads, self.head_dim])

    @property
    def query_unit_params(self) -> int:
        """Parameters of the largest query unit (a rotary pair, or one dim): W_Q rows of every
        query head of the group, the W_K row, their biases."""
        dims = 2 if self.rotary_dims else 1
        return dims * (
            self.group_size * self.q.params_per_output()
            + self.k.params_per_output()
            + self.query_dim_params
        )

    @property
    def feature_projections(self) -> tuple[Projection, ...]:
        """Projections of the features with weights of their own (not W_Q's or W_K's) that
        the query units cover (DeBERTa's position projections)."""
        return tuple(p for f in self.features for p in f.projections(self))

    @property
    def query_dim_params(self) -> int:
        """Parameters of the features' own weights per query dim."""
        return sum(f.params_per_query_dim(self) for f in self.features)

    @property
    def value_unit_params(self) -> int:
        """Parameters of one value unit: the W_V row (+ bias) and the W_O column(s)."""
        return self.v.params_per_output() + self.group_size * self.o.out_features

    @property
    def head_unit_params(self) -> int:
        """Parameters of one query head (W_Q rows and W_O columns) with all its dims kept."""
        return self.head_dim * (self.q.params_per_output() + self.o.out_features)

    def mask_names(self) -> dict[str, str]:
        """``{kind: mask name}`` of the masks this block has."""
        names = {"vo": f"{self.name}.vo"}
        if self.has_query_units:
            names["qk"] = f"{self.name}.qk"
        if self.has_head_units:
            names["heads"] = f"{self.name}.heads"
        return names

    def per_head(
        self, masks: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boolean (query dims, value dims) of shape heads x head_dim and the live heads.

        A query head is live when it has value dims and its head unit is kept; dims of heads
        that are not live count as removed.
        """
        names = self.mask_names()
        vo = self.expand_vo(masks[names["vo"]].detach().bool())
        if "qk" in names:
            qk = self.expand_qk(masks[names["qk"]].detach().bool())
        else:
            qk = torch.ones(self.num_heads, self.head_dim, dtype=torch.bool)
        live = vo.any(dim=1)
        if "heads" in names:
            live = live & masks[names["heads"]].detach().bool()
        return qk & live[:, None], vo & live[:, None], live

    def kept_params(self, masks: Mapping[str, torch.Tensor]) -> int:
        """Unit parameters this block keeps in the compact model for these (binary) masks."""
        qk, vo, live = self.per_head(masks)
        g = self.group_size
        fixed = sum(f.fixed_params() for f in self.features)
        group_qk = qk.view(self.kv_heads, g, -1).any(dim=1)
        group_vo = vo.view(self.kv_heads, g, -1).any(dim=1)
        return (
            int(qk.sum()) * self.q.params_per_output()
            + int(group_qk.sum()) * self.k.params_per_output()
            + int(qk.sum()) * self.query_dim_params
            + int(group_vo.sum()) * self.v.params_per_output()
            + int(vo.sum()) * self.o.out_features
            + (fixed if bool(live.any()) else 0)
        )

    def expand_qk(self, mask: torch.Tensor) -> torch.Tensor:
        """A qk mask (kv heads x units) as a per-query-head mask (heads x head_dim)."""
        return mask[:, self.unit_of_dim()].repeat_interleave(self.group_size, dim=0)

    def expand_vo(self, mask: torch.Tensor) -> torch.Tensor:
        """A vo mask (kv heads x head_dim) as a per-query-head mask (heads x head_dim)."""
        return mask.repeat_interleave(self.group_size, dim=0)

    def ones(self) -> dict[str, torch.Tensor]:
        shapes = {"qk": self.qk_shape, "vo": self.vo_shape, "heads": torch.Size([self.num_heads])}
        return {name: torch.ones(shapes[kind]) for kind, name in self.mask_names().items()}

    @property
    def params(self) -> int:
        """Unit parameters of the dense block."""
        return self.kept_params(self.ones())

    def notes(self) -> list[str]:
        """What each feature changes about this block's units, in feature order."""
        return [n for f in self.features if (n := f.note(self)) is not None]

    # Read-only views of the features under the fields AttentionBlock had before them.

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads

    @property
    def rope(self) -> Rope | None:
        """Rotary positions of the queries."""
        found = self._find("Rotary")
        return cast("Rotary", found).q if found is not None else None

    @property
    def rope_k(self) -> Rope | None:
        """Rotary positions of the keys."""
        found = self._find("Rotary")
        return cast("Rotary", found).k if found is not None else None

    @property
    def q_norm(self) -> HeadNorm | None:
        found = self._find("HeadNorms")
        return cast("HeadNorms", found).q if found is not None else None

    @property
    def k_norm(self) -> HeadNorm | None:
        found = self._find("HeadNorms")
        return cast("HeadNorms", found).k if found is not None else None

    @property
    def attn_mask(self) -> str | None:
        """The mask given to sdpa."""
        found = self._find("SdpaMask")
        return cast("SdpaMask", found).mask if found is not None else None

    @property
    def score_biases(self) -> tuple[str, ...]:
        """The tensors added to canonical eager scores."""
        found = self._find("ScoreBiases")
        return cast("ScoreBiases", found).biases if found is not None else ()

    @property
    def score_ops(self) -> tuple[str, ...]:
        """The nodes of a replayed score chain (score matmul to context matmul)."""
        found = self._find("ScoreReplay")
        return cast("ScoreReplay", found).ops if found is not None else ()

    @property
    def relative(self) -> tuple[RelativeTerm, ...]:
        """Disentangled relative-position terms added to the scores."""
        found = self._find("RelativeTerms")
        return cast("RelativeTerms", found).terms if found is not None else ()

    @property
    def relative_ops(self) -> tuple[str, ...]:
        found = self._find("RelativeTerms")
        return cast("RelativeTerms", found).ops if found is not None else ()

    @property
    def relative_projections(self) -> tuple[Projection, ...]:
        return self.feature_projections

    @property
    def relative_params_per_dim(self) -> int:
        return self.query_dim_params

    def _find(self, name: str) -> AttentionFeature | None:
        """The feature whose class is called ``name`` (the views above cannot import the
        feature modules: those import the passes, which import this module)."""
        return next((f for f in self.features if type(f).__name__ == name), None)


@dataclass(frozen=True)
class FFNBlock:
    """One feed-forward block: up (and gate) projection, elementwise ops, down projection."""

    name: str
    up: Projection
    down: Projection
    gate: Projection | None = None
    region: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return self.up.out_features

    @property
    def unit_params(self) -> int:
        """Parameters of one FFN unit: up (and gate) row with bias, down column."""
        gate = self.gate.params_per_output() if self.gate is not None else 0
        return self.up.params_per_output() + gate + self.down.out_features


@dataclass(frozen=True)
class UnitGroup:
    """All units of one kind in one block, as one mask."""

    mask: str
    kind: str  # "query", "value", "qhead" (a query head of a GQA group) or "ffn"
    block: str
    shape: torch.Size
    unit_params: int

    @property
    def count(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def params(self) -> int:
        return self.count * self.unit_params


@dataclass(frozen=True)
class Structure:
    """What discover found: attention and FFN blocks, layer outputs, parameter totals."""

    attention: tuple[AttentionBlock, ...]
    ffn: tuple[FFNBlock, ...]
    layer_outputs: tuple[str, ...]
    total_params: int
    #: Weights of linear layers inside the transformer layers that no unit covers: they stay
    #: whole (a pattern discover did not recognise); empty when every one is covered.
    uncovered: tuple[str, ...] = ()
    #: Parameters that only attention scores read (T5's and MPNet's relative position bias
    #: tables): ``(size, blocks that read them)``; they go when every one of those is empty.
    score_params: tuple[tuple[int, tuple[str, ...]], ...] = ()

    def units(self) -> list[UnitGroup]:
        """Every unit group, attention (query, value, query heads) then FFN, in block order.

        Blocks whose query/key dims pass a norm offer no query units (removing one would
        change the norm of the others); blocks with one key/value head per query head offer
        no head units (a head without value units is gone already)."""
        groups = []
        for block in self.attention:
            names = block.mask_names()
            if "qk" in names:
                groups.append(
                    UnitGroup(
                        names["qk"], "query", block.name, block.qk_shape, block.query_unit_params
                    )
                )
            groups.append(
                UnitGroup(names["vo"], "value", block.name, block.vo_shape, block.value_unit_params)
            )
            if "heads" in names:
                groups.append(
                    UnitGroup(
                        names["heads"],
                        "qhead",
                        block.name,
                        torch.Size([block.num_heads]),
                        block.head_unit_params,
                    )
                )
        for ffn in self.ffn:
            groups.append(
                UnitGroup(ffn.name, "ffn", ffn.name, torch.Size([ffn.width]), ffn.unit_params)
            )
        return groups

    def mask_shapes(self) -> dict[str, torch.Size]:
        """``{mask name: shape}`` of every mask instrument inserts."""
        return {g.mask: g.shape for g in self.units()}

    def ones(self) -> dict[str, torch.Tensor]:
        """All-ones masks (nothing pruned)."""
        return {name: torch.ones(s) for name, s in self.mask_shapes().items()}

    @property
    def unit_params(self) -> int:
        """Parameters held by all prunable units (Q, K, V, O rows and columns, FFN rows and
        columns; biases included)."""
        return sum(block.params for block in self.attention) + sum(
            block.width * block.unit_params for block in self.ffn
        )

    def kept_unit_params(self, masks: Mapping[str, torch.Tensor]) -> int:
        """Unit parameters that the compact model keeps for these (binary) masks.

        Query units of a head without value units are dropped with the head; key and value
        rows of a key/value head go when none of its query heads is left.
        """
        kept = sum(block.kept_params(masks) for block in self.attention)
        for block in self.ffn:
            kept += int(masks[block.name].detach().bool().sum()) * block.unit_params
        return kept

    def density(self, masks: Mapping[str, torch.Tensor]) -> float:
        """Kept share of unit parameters for these masks."""
        return self.kept_unit_params(masks) / self.unit_params

    def count_params(self, masks: Mapping[str, torch.Tensor]) -> int:
        """Parameters of the compact module that rewrite makes from these masks."""
        live = {b.name for b in self.attention if bool(b.per_head(masks)[2].any())}
        dropped = sum(size for size, blocks in self.score_params if live.isdisjoint(blocks))
        return self.total_params - self.unit_params + self.kept_unit_params(masks) - dropped

    def covered(self) -> dict[str, tuple[str, ...]]:
        """``{block name: weights of the linear layers its units cover}``."""
        blocks: list[tuple[str, tuple[Projection | None, ...]]]
        blocks = [(b.name, (b.q, b.k, b.v, b.o) + b.feature_projections) for b in self.attention]
        blocks += [(b.name, (b.up, b.gate, b.down)) for b in self.ffn]
        return {
            name: tuple(dict.fromkeys(p.weight for p in projections if p is not None))
            for name, projections in blocks
        }

    def coverage(self) -> str:
        """One line: the prunable share of the parameters and what inside the layers is not
        covered."""
        line = (
            f"coverage: {self.unit_params / self.total_params:.0%} of the parameters are "
            f"in prunable units (the rest: embeddings, norms, heads)"
        )
        if self.uncovered:
            line += (
                f"; {len(self.uncovered)} linear layers inside the transformer layers are "
                f"not covered and stay whole: {', '.join(self.uncovered)}"
            )
        return line

    def notes(self) -> list[str]:
        """What each attention block offers beyond plain heads, and what it does not."""
        lines = [self.coverage()]
        for block in self.attention:
            parts = block.notes()
            if parts:
                lines.append(f"{block.name}: " + "; ".join(parts))
        return lines

    def __str__(self) -> str:
        lines = [
            f"Structure: {len(self.attention)} attention blocks, {len(self.ffn)} FFN blocks, "
            f"{self.unit_params:,} unit parameters of {self.total_params:,}"
        ]
        header = (
            f"{'block':<10}{'heads x size':>14}{'ffn width':>11}{'query':>8}{'value':>8}"
            f"{'ffn':>8}{'unit params':>14}"
        )
        lines.append(header)
        ffn_by_index = dict(enumerate(self.ffn))
        rows = max(len(self.attention), len(self.ffn))
        for i in range(rows):
            attn = self.attention[i] if i < len(self.attention) else None
            ffn = ffn_by_index.get(i)
            heads = "-"
            if attn:
                kv = f" ({attn.kv_heads} kv)" if attn.group_size > 1 else ""
                heads = f"{attn.num_heads}{kv} x {attn.head_dim}"
            width = str(ffn.width) if ffn else "-"
            nq = attn.qk_shape.numel() if attn and attn.has_query_units else 0
            nv = attn.vo_shape.numel() if attn else 0
            nf = ffn.width if ffn else 0
            params = attn.params if attn else 0
            params += nf * ffn.unit_params if ffn else 0
            lines.append(
                f"{'layer ' + str(i):<10}{heads:>14}{width:>11}{nq:>8}{nv:>8}{nf:>8}{params:>14,}"
            )
        return "\n".join(lines + self.notes())
