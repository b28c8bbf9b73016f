"""The shared vocabulary of the passes: attention and FFN blocks and their prunable units.

A prunable unit is a group of weight slices that go together:

* query unit (g, j): dimension j of the query/key heads of group g: the rows of W_Q (for every
  query head of a GQA group) and of W_K, with their biases (with RoPE, the rotated pair of dims);
* value unit (g, j): row j of value head g in W_V (+ bias) and the matching columns of W_O (for
  every query head that reads that value head);
* FFN unit i: row i of the up (and gate) projection (+ bias) and column i of the down projection.

Masks are named ``<block>.qk``, ``<block>.vo`` (shape: kv heads x units per head) and
``<block>`` for FFN blocks (shape: width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from passes.graph import Projection


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block: projections, head layout and what the scores are made of.

    ``kind`` is ``"sdpa"`` or ``"eager"`` (matmul-softmax-matmul). ``attn_mask`` is the mask
    given to sdpa, ``score_biases`` the tensors added to eager scores, both node names;
    ``scale`` is the factor applied to q.k.
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
    attn_mask: str | None = None
    score_biases: tuple[str, ...] = ()
    is_causal: bool = False
    num_kv_heads: int | None = None
    rope: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 without GQA)."""
        return self.num_heads // self.kv_heads

    @property
    def qk_shape(self) -> torch.Size:
        per_head = self.head_dim // 2 if self.rope else self.head_dim
        return torch.Size([self.kv_heads, per_head])

    @property
    def vo_shape(self) -> torch.Size:
        return torch.Size([self.kv_heads, self.head_dim])

    @property
    def query_unit_params(self) -> int:
        """Parameters of one query unit: W_Q rows of the group, the W_K row, their biases."""
        dims = 2 if self.rope else 1
        return dims * (self.group_size * self.q.params_per_output() + self.k.params_per_output())

    @property
    def value_unit_params(self) -> int:
        """Parameters of one value unit: the W_V row (+ bias) and the W_O column(s)."""
        return self.v.params_per_output() + self.group_size * self.o.out_features

    def expand_qk(self, mask: torch.Tensor) -> torch.Tensor:
        """A qk mask (kv heads x units) as a per-query-head mask (heads x head_dim)."""
        per_head = torch.cat([mask, mask], dim=-1) if self.rope else mask
        return per_head.repeat_interleave(self.group_size, dim=0)

    def expand_vo(self, mask: torch.Tensor) -> torch.Tensor:
        """A vo mask (kv heads x head_dim) as a per-query-head mask (heads x head_dim)."""
        return mask.repeat_interleave(self.group_size, dim=0)


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
    kind: str  # "query", "value" or "ffn"
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

    def units(self) -> list[UnitGroup]:
        """Every unit group, attention (query, value) then FFN, in block order."""
        groups = []
        for block in self.attention:
            groups.append(UnitGroup(f"{block.name}.qk", "query", block.name, block.qk_shape,
                                    block.query_unit_params))
            groups.append(UnitGroup(f"{block.name}.vo", "value", block.name, block.vo_shape,
                                    block.value_unit_params))
        for block in self.ffn:
            groups.append(UnitGroup(block.name, "ffn", block.name, torch.Size([block.width]),
                                    block.unit_params))
        return groups

    def mask_shapes(self) -> dict[str, torch.Size]:
        """``{mask name: shape}`` of every mask instrument inserts."""
        return {g.mask: g.shape for g in self.units()}

    def ones(self) -> dict[str, torch.Tensor]:
        """All-ones masks (nothing pruned)."""
        return {name: torch.ones(s) for name, s in self.mask_shapes().items()}

    @property
    def unit_params(self) -> int:
        """Parameters held by all prunable units."""
        return sum(g.params for g in self.units())

    def kept_unit_params(self, masks: Mapping[str, torch.Tensor]) -> int:
        """Unit parameters that the compact model keeps for these (binary) masks.

        Query units of a head without value units are dropped with the head.
        """
        kept = 0
        for block in self.attention:
            qk = masks[f"{block.name}.qk"].detach().bool()
            vo = masks[f"{block.name}.vo"].detach().bool()
            live = vo.any(dim=1)
            kept += int((qk & live[:, None]).sum()) * block.query_unit_params
            kept += int(vo.sum()) * block.value_unit_params
        for block in self.ffn:
            kept += int(masks[block.name].detach().bool().sum()) * block.unit_params
        return kept

    def density(self, masks: Mapping[str, torch.Tensor]) -> float:
        """Kept share of unit parameters for these masks."""
        return self.kept_unit_params(masks) / self.unit_params

    def count_params(self, masks: Mapping[str, torch.Tensor]) -> int:
        """Parameters of the compact module that rewrite makes from these masks."""
        return self.total_params - self.unit_params + self.kept_unit_params(masks)

    def __str__(self) -> str:
        lines = [f"Structure: {len(self.attention)} attention blocks, {len(self.ffn)} FFN blocks, "
                 f"{self.unit_params:,} unit parameters of {self.total_params:,}"]
        header = (f"{'block':<10}{'heads x size':>14}{'ffn width':>11}{'query':>8}{'value':>8}"
                  f"{'ffn':>8}{'unit params':>14}")
        lines.append(header)
        ffn_by_index = dict(enumerate(self.ffn))
        rows = max(len(self.attention), len(self.ffn))
        for i in range(rows):
            attn = self.attention[i] if i < len(self.attention) else None
            ffn = ffn_by_index.get(i)
            heads = f"{attn.num_heads} x {attn.head_dim}" if attn else "-"
            width = str(ffn.width) if ffn else "-"
            nq = attn.qk_shape.numel() if attn else 0
            nv = attn.vo_shape.numel() if attn else 0
            nf = ffn.width if ffn else 0
            params = ((nq * attn.query_unit_params + nv * attn.value_unit_params) if attn else 0)
            params += nf * ffn.unit_params if ffn else 0
            lines.append(f"{'layer ' + str(i):<10}{heads:>14}{width:>11}{nq:>8}{nv:>8}{nf:>8}"
                         f"{params:>14,}")
        return "\n".join(lines)
