"""grainfx.importance: EMA, structure regularization, random scores, global monotone ranking."""

from __future__ import annotations

import math

import pytest
import torch

from grainfx.config import GrainConfig
from grainfx.importance import Importance, all_finite
from tests.captures import structure as captured_structure

ARCH = "bert-sdpa"
#: The run length every Importance here belongs to (``ema_beta="auto"`` needs one).
STEPS = 500


@pytest.fixture(scope="module")
def structure():
    return captured_structure(ARCH)


@pytest.mark.parametrize("arch", ["llama-sdpa", "qwen3-eager"])
@pytest.mark.parametrize(
    "granularity,query_heads", [("intra", True), ("intra", False), ("head", True)]
)
def test_prune_reaches_density_under_gqa_rope_and_head_norms(arch, granularity, query_heads):
    struct = captured_structure(arch)
    importance = Importance(
        struct, GrainConfig(granularity=granularity, query_heads=query_heads), STEPS
    )
    masks = struct.ones()
    for step, target in enumerate([0.8, 0.5, 0.2]):
        random_scores(importance, seed=step)
        new = importance.prune(masks, target)
        assert new.keys() == masks.keys()
        assert all(bool((new[n] <= masks[n]).all()) for n in new)
        assert struct.density(new) <= target + 1e-12
        masks = new
    if granularity == "head" or not query_heads:  # query heads are not ranked
        assert all(bool(masks[f"{b.name}.heads"].all()) for b in struct.attention)


def random_scores(importance: Importance, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    importance.scores = {
        name: torch.rand(s.shape, generator=gen) for name, s in importance.scores.items()
    }


def random_grads(structure, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: scale * torch.randn(shape, generator=gen)
        for name, shape in structure.mask_shapes().items()
    }


def max_overshoot(structure) -> float:
    """Most density one pruning decision can remove beyond the target: one unit, plus the
    query units of its head when it was the head's last value unit."""
    most = max(g.unit_params for g in structure.units())
    head_queries = max(b.qk_shape[1] * b.query_unit_params for b in structure.attention)
    return (most + head_queries) / structure.unit_params


# -- prune ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["intra", "head"])
def test_prune_is_monotone_and_hits_density(structure, granularity):
    importance = Importance(structure, GrainConfig(granularity=granularity), STEPS)
    masks = structure.ones()
    for step, target in enumerate([0.95, 0.8, 0.6, 0.6, 0.4, 0.2, 0.1]):
        random_scores(importance, seed=step)  # pruned units may now score highest
        new = importance.prune(masks, target)
        assert new.keys() == masks.keys()
        for name, mask in new.items():
            assert mask.shape == masks[name].shape
            assert bool(((mask == 0) | (mask == 1)).all()), name
            assert bool((mask <= masks[name]).all()), f"{name}: a pruned unit came back"
        density = structure.density(new)
        assert density <= target + 1e-12
        slack = (
            max_overshoot(structure)
            if granularity == "intra"
            else max(
                [
                    (b.qk_shape[1] * b.query_unit_params + b.vo_shape[1] * b.value_unit_params)
                    / structure.unit_params
                    for b in structure.attention
                ]
                + [b.unit_params / structure.unit_params for b in structure.ffn]
            )
        )
        assert target - density <= slack, (target, density)
        masks = new


def test_prune_does_nothing_below_target(structure):
    importance = Importance(structure, GrainConfig(), STEPS)
    random_scores(importance, 0)
    masks = importance.prune(structure.ones(), 0.5)
    again = importance.prune(masks, 0.7)
    for name in masks:
        assert torch.equal(again[name], masks[name])
        assert again[name] is not masks[name]


def test_prune_removes_lowest_scores_first(structure):
    importance = Importance(structure, GrainConfig(), STEPS)
    random_scores(importance, 3)
    ones = structure.ones()
    masks = importance.prune(ones, 0.6)
    live = {n: masks[n].bool() for n in masks}
    for block in structure.attention:  # query units of a head without value units are gone
        live[f"{block.name}.qk"] &= masks[f"{block.name}.vo"].bool().any(dim=1, keepdim=True)
    pruned = torch.cat([importance.scores[n][masks[n] == 0] for n in masks])
    kept = torch.cat([importance.scores[n][live[n]] for n in masks])
    assert pruned.numel() > 0 and kept.numel() > 0
    assert pruned.max() < kept.min()


def test_prune_ranks_globally_across_layers_and_kinds(structure):
    """Low scores in one block only: that block empties before anything else goes."""
    importance = Importance(structure, GrainConfig(), STEPS)
    importance.scores = {n: torch.ones_like(s) for n, s in importance.scores.items()}
    ffn = structure.ffn[1].name
    importance.scores[ffn] = torch.full_like(importance.scores[ffn], 0.5)
    share = structure.ffn[1].width * structure.ffn[1].unit_params / structure.unit_params
    masks = importance.prune(structure.ones(), 1 - share + 1e-9)
    assert int(masks[ffn].sum()) == 0
    for name, mask in masks.items():
        if name != ffn:
            assert bool((mask == 1).all()), name


def test_head_granularity_prunes_whole_heads(structure):
    importance = Importance(structure, GrainConfig(granularity="head"), STEPS)
    masks = structure.ones()
    for step, target in enumerate([0.8, 0.5, 0.3]):
        random_scores(importance, seed=10 + step)
        masks = importance.prune(masks, target)
        dropped = 0
        for block in structure.attention:
            qk, vo = masks[f"{block.name}.qk"], masks[f"{block.name}.vo"]
            for head in range(block.num_heads):
                assert qk[head].unique().numel() == 1, f"{block.name} head {head}: split qk"
                assert vo[head].unique().numel() == 1, f"{block.name} head {head}: split vo"
                assert qk[head, 0] == vo[head, 0], f"{block.name} head {head}: qk != vo"
                dropped += int(vo[head, 0] == 0)
        assert structure.density(masks) <= target
    assert dropped > 0


def test_head_score_is_value_gradient_summed_over_head(structure):
    importance = Importance(structure, GrainConfig(granularity="head"), STEPS)
    grads = random_grads(structure, 0)
    raw = importance.raw(grads, structure.ones())
    for block in structure.attention:
        expected = grads[f"{block.name}.vo"].sum(dim=1).abs()
        assert torch.equal(raw[f"{block.name}.head"], expected)
    for block in structure.ffn:
        assert torch.equal(raw[block.name], grads[block.name].abs())


# -- scores --------------------------------------------------------------------------------------


def test_raw_scores_are_absolute_mask_gradients(structure):
    importance = Importance(structure, GrainConfig(structure_regularization=False), STEPS)
    grads = random_grads(structure, 1)
    raw = importance.raw(grads, structure.ones())
    assert raw.keys() == grads.keys()
    for name in grads:
        assert torch.equal(raw[name], grads[name].abs())


def test_ema_update(structure):
    beta = 0.9
    importance = Importance(
        structure, GrainConfig(ema_beta=beta, structure_regularization=False), STEPS
    )
    first, second = random_grads(structure, 1), random_grads(structure, 2)
    ones = structure.ones()
    importance.update(first, ones)
    importance.update(second, ones)
    for name in first:
        expected = beta * (1 - beta) * first[name].abs() + (1 - beta) * second[name].abs()
        assert torch.allclose(importance.scores[name], expected, rtol=1e-6, atol=0)


def test_structure_regularization_scales_value_scores(structure):
    alpha = 0.3
    config = GrainConfig(structure_alpha=alpha)
    importance = Importance(structure, config, STEPS)
    plain = Importance(structure, GrainConfig(structure_regularization=False), STEPS)
    grads = random_grads(structure, 4)
    masks = structure.ones()
    gen = torch.Generator().manual_seed(5)
    for block in structure.attention:
        vo = masks[f"{block.name}.vo"]
        vo.copy_((torch.rand(vo.shape, generator=gen) < 0.6).float())
        vo[0] = 1.0  # a full head
        vo[1] = 0.0  # an empty head
    raw, base = importance.raw(grads, masks), plain.raw(grads, masks)
    for block in structure.attention:
        name = f"{block.name}.vo"
        share = masks[name].mean(dim=1, keepdim=True)  # D: kept share of the head's value units
        factor = torch.tanh(share / alpha)
        assert torch.allclose(raw[name], grads[name].abs() * factor, rtol=1e-6, atol=0)
        assert torch.allclose(raw[name][0], grads[name][0].abs() * math.tanh(1 / alpha))
        assert bool((raw[name][1] == 0).all())
        # query units are not regularized
        assert torch.equal(raw[f"{block.name}.qk"], base[f"{block.name}.qk"])
    for block in structure.ffn:
        assert torch.equal(raw[block.name], base[block.name])


def test_random_scores_ignore_gradients_and_follow_seed(structure):
    def ranking(seed: int, grad_seed: int):
        importance = Importance(structure, GrainConfig(random_scores=True, seed=seed), STEPS)
        masks = structure.ones()
        for step in range(3):
            importance.update(random_grads(structure, grad_seed + step, scale=10.0**step), masks)
        return importance.scores, importance.prune(masks, 0.5)

    scores_a, masks_a = ranking(0, grad_seed=0)
    scores_b, masks_b = ranking(0, grad_seed=100)  # other gradients: same ranking
    scores_c, masks_c = ranking(1, grad_seed=0)  # other seed: another ranking
    for name in scores_a:
        assert torch.equal(scores_a[name], scores_b[name])
        assert torch.equal(masks_a[name], masks_b[name])
    assert any(not torch.equal(masks_a[n], masks_c[n]) for n in masks_a)
    # the scores do not follow the gradient magnitudes
    grads = random_grads(structure, 0)
    flat_scores = torch.cat([scores_a[n].flatten() for n in sorted(grads)])
    flat_grads = torch.cat([grads[n].abs().flatten() for n in sorted(grads)])
    corr = torch.corrcoef(torch.stack([flat_scores, flat_grads]))[0, 1]
    assert abs(float(corr)) < 0.3


def test_state_dict_round_trip(structure):
    importance = Importance(structure, GrainConfig(random_scores=True, seed=3), STEPS)
    importance.update(random_grads(structure, 0), structure.ones())
    state = importance.state_dict()
    copy = Importance(structure, GrainConfig(random_scores=True, seed=3), STEPS)
    copy.load_state_dict(state)
    importance.update(random_grads(structure, 1), structure.ones())
    copy.update(random_grads(structure, 1), structure.ones())
    for name in importance.scores:
        assert torch.equal(importance.scores[name], copy.scores[name])


def test_all_finite():
    assert all_finite([torch.ones(2), None, torch.zeros(())])
    assert not all_finite([torch.ones(2), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor(float("inf"))])


# -- latency-aware ranking ---------------------------------------------------------------------


def test_latency_aware_ranking_ends_with_fewer_fuller_heads(structure):
    """Same scores, same density: pricing each head's sequence x sequence work makes the
    ranking empty whole heads of query units instead of thinning every head."""
    config = GrainConfig()
    plain = Importance(structure, config, STEPS)
    prices = {b.mask_names()["qk"]: 20.0 for b in structure.attention}
    aware = Importance(structure, GrainConfig(latency_aware=True), STEPS, prices=prices)
    random_scores(plain, seed=3)
    aware.scores = {k: v.clone() for k, v in plain.scores.items()}
    masks_plain = masks_aware = structure.ones()
    for target in (0.8, 0.6, 0.4, 0.3):
        masks_plain = plain.prune(masks_plain, target)
        masks_aware = aware.prune(masks_aware, target)
        assert structure.density(masks_aware) <= target + 1e-12

    def heads_with_queries(masks):
        return sum(int(masks[name].any(dim=-1).sum()) for name in prices)

    assert heads_with_queries(masks_aware) < heads_with_queries(masks_plain)


def test_latency_aware_divides_query_scores_by_their_cost(structure):
    name = structure.attention[0].mask_names()["qk"]
    aware = Importance(structure, GrainConfig(latency_aware=True), STEPS, prices={name: 6.0})
    random_scores(aware, seed=0)
    alive = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in aware.scores.items()}
    alive[name][0, 2:] = False  # 2 query units left in head 0
    ranked = aware.ranked_scores(alive)
    width = alive[name].shape[1]
    assert torch.allclose(ranked[name][0], aware.scores[name][0] / (1 + 6.0 / 2))
    assert torch.allclose(ranked[name][1], aware.scores[name][1] / (1 + 6.0 / width))
    for other in set(ranked) - {name}:  # value units, FFN neurons, other blocks: unchanged
        assert torch.equal(ranked[other], aware.scores[other])


def test_latency_prices_are_measured_positive_and_survive_a_checkpoint(structure):
    aware = Importance(structure, GrainConfig(latency_aware=True, latency_shape=(2, 16)), STEPS)
    assert set(aware.prices) == {b.mask_names()["qk"] for b in structure.attention}
    assert all(math.isfinite(p) and p > 0 for p in aware.prices.values())
    again = Importance(structure, GrainConfig(latency_aware=True), STEPS, prices={"x": 1.0})
    again.load_state_dict(aware.state_dict())
    assert again.prices == aware.prices
    assert Importance(structure, GrainConfig(), STEPS).prices == {}


@pytest.mark.parametrize("beta", [0.998, 0.9, 0.25, 0.0])
def test_flat_scores_are_judged_on_the_mean_gradient_whatever_the_ema(structure, beta):
    # after 2 updates of |dL/dm| = g, the EMA holds g * (1 - beta^2): the verdict must not
    # depend on beta (a student equal to its teacher gives g ~ 1e-8, a real signal 1e-3)
    importance = Importance(structure, GrainConfig(ema_beta=beta), STEPS)
    for g, flat in ((1e-8, True), (1e-3, False)):
        importance.scores = {
            n: torch.full_like(s, g * (1 - beta**2)) for n, s in importance.scores.items()
        }
        assert importance.is_flat(2) is flat
    assert not Importance(structure, GrainConfig(random_scores=True), STEPS).is_flat(2)
