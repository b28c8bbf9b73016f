"""Importance scores, their EMA, structure regularization and the global, monotone ranking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from grainfx.config import ConfigError, GrainConfig
from grainfx.latency import head_prices
from passes.structure import Structure


@dataclass(frozen=True)
class ScoreGroup:
    """Units ranked together as one tensor: a mask (intra) or the heads of a block (head)."""

    name: str
    kind: str  # "query", "value", "ffn" or "head"
    shape: torch.Size
    unit_params: int


class Importance:
    """Smoothed |dL/dm| scores of every unit and the pruning decisions made from them."""

    def __init__(
        self,
        structure: Structure,
        config: GrainConfig,
        total_steps: int = 0,
        prices: Mapping[str, float] | None = None,
    ):
        """``total_steps``: the run's length, which ``ema_beta="auto"`` needs. ``prices``:
        under ``latency_aware``, the fixed cost of a head of each query mask in query-unit
        projections (:func:`grainfx.latency.head_prices`); measured here when not given."""
        self.structure, self.config = structure, config
        if config.ema_beta == "auto" and total_steps < 1:
            raise ConfigError(
                "GrainConfig: ema_beta='auto' needs the run's length; pass "
                "total_steps to Importance"
            )
        self.beta = config.beta(total_steps)
        if config.granularity == "intra":
            self.groups = [
                ScoreGroup(g.mask, g.kind, g.shape, g.unit_params)
                for g in structure.units()
                if config.query_heads or g.kind != "qhead"
            ]
        else:
            # whole heads; under GQA whole key/value groups with their query heads
            self.groups = [
                ScoreGroup(
                    f"{b.name}.head", "head", torch.Size([b.kv_heads]), b.params // b.kv_heads
                )
                for b in structure.attention
            ]
            self.groups += [
                ScoreGroup(b.name, "ffn", torch.Size([b.width]), b.unit_params)
                for b in structure.ffn
            ]
        self.scores = {g.name: torch.zeros(g.shape) for g in self.groups}
        if config.latency_aware and prices is None:
            prices = head_prices(structure, config.latency_shape)
        self.prices = dict(prices or {}) if config.latency_aware else {}
        self._random = torch.Generator().manual_seed(config.seed)

    def raw(
        self, grads: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """This step's importance of each group (before smoothing)."""
        if self.config.random_scores:
            return {g.name: torch.rand(g.shape, generator=self._random) for g in self.groups}
        scores = {}
        for group in self.groups:
            if group.kind == "head":
                block = group.name[: -len(".head")]
                scores[group.name] = grads[f"{block}.vo"].detach().sum(dim=1).abs()
                continue
            score = grads[group.name].detach().abs()
            if group.kind == "value" and self.config.structure_regularization:
                kept = masks[group.name].detach().float().mean(dim=1, keepdim=True)
                score = score * torch.tanh(kept / self.config.structure_alpha)
            scores[group.name] = score
        return scores

    def update(self, grads: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        """Fold one step's gradients into the EMA: S = beta S + (1 - beta) |dL/dm|."""
        beta = self.beta
        for name, score in self.raw(grads, masks).items():
            self.scores[name] = beta * self.scores[name] + (1 - beta) * score.float()

    def is_flat(self, updates: int, tolerance: float = 1e-6) -> bool:
        """True when every score is ~0 (no gradient signal: the ranking would be arbitrary)
        after ``updates`` EMA updates. The scores are bias-corrected first (divided by
        1 - beta^updates, the weight the EMA has given the gradients so far), so that the test
        reads the mean |dL/dm| whatever the EMA factor; a student equal to its teacher shows
        ~1e-8 there (rounding and weight decay), a real signal 1e-3 and more."""
        if self.config.random_scores:
            return False
        weight = 1.0 - self.beta ** max(updates, 1)
        return all(float(s.abs().max()) / weight <= tolerance for s in self.scores.values())

    def _alive(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        alive = {}
        for group in self.groups:
            if group.kind == "head":
                block = group.name[: -len(".head")]
                alive[group.name] = masks[f"{block}.vo"].detach().bool().any(dim=1)
            else:
                alive[group.name] = masks[group.name].detach().bool()
        return alive

    def _masks(
        self, alive: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        masks = {}
        for group in self.groups:
            if group.kind == "head":
                block = group.name[: -len(".head")]
                for kind in ("qk", "vo", "heads"):
                    name = f"{block}.{kind}"
                    if name not in like:
                        continue
                    if kind == "heads":  # query heads inside a group are not ranked here
                        masks[name] = like[name].detach().clone()
                        continue
                    shape = like[name].shape
                    masks[name] = alive[group.name][:, None].expand(shape).float()
            else:
                masks[group.name] = alive[group.name].float()
        for name, mask in like.items():  # masks no group ranks (query heads when not units)
            masks.setdefault(name, mask.detach().clone())
        return masks

    def prune(self, masks: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
        """New masks: the lowest-scored kept units pruned until the density is <= ``density``.

        Ranking is global over all groups; pruned units stay pruned.
        """
        if self.structure.density(masks) <= density:
            return {name: m.detach().clone() for name, m in masks.items()}
        alive = self._alive(masks)
        names = [g.name for g in self.groups]
        ranked = self.ranked_scores(alive)
        flat_scores = torch.cat([ranked[n].flatten() for n in names])
        flat_alive = torch.cat([alive[n].flatten() for n in names])
        sizes = [self.scores[n].numel() for n in names]
        candidates = torch.nonzero(flat_alive).flatten()
        order = candidates[torch.argsort(flat_scores[candidates], stable=True)]

        def masks_after(count: int) -> dict[str, torch.Tensor]:
            keep = flat_alive.clone()
            keep[order[:count]] = False
            parts = dict(zip(names, keep.split(sizes), strict=True))
            return self._masks({n: parts[n].view(self.scores[n].shape) for n in names}, masks)

        low, high = 0, len(order)  # smallest count whose density is <= target
        while low < high:
            mid = (low + high) // 2
            if self.structure.density(masks_after(mid)) <= density:
                high = mid
            else:
                low = mid + 1
        return masks_after(low)

    def ranked_scores(self, alive: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The scores the ranking compares: the EMA scores, and under ``latency_aware`` a
        query unit's score divided by its cost, 1 (its own projection) plus its share of its
        key/value group's fixed cost (the price over the group's query units still alive)."""
        ranked = dict(self.scores)
        for name, price in self.prices.items():
            left = alive[name].sum(dim=-1, keepdim=True).clamp(min=1)
            ranked[name] = self.scores[name] / (1 + price / left)
        return ranked

    def state_dict(self) -> dict:
        return {
            "scores": {k: v.clone() for k, v in self.scores.items()},
            "random": self._random.get_state(),
            "prices": dict(self.prices),
        }

    def load_state_dict(self, state: dict) -> None:
        self.scores = {k: v.clone() for k, v in state["scores"].items()}
        self._random.set_state(state["random"])
        self.prices = dict(state.get("prices", self.prices))


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True when every tensor (None skipped) holds finite values only."""
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)
