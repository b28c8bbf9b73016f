"""The rewrite against the masked graph: exact outputs, predicted size, clean graph, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import passes
from passes.graph import aten
from passes.instrument import mask_buffers
from tests.captures import captured, model, structure
from tests.models import ALL_ARCHITECTURES, example_inputs

KINDS = (
    "ones",
    "random",
    "whole_heads_zero",
    "value_only_heads",
    "query_only_heads",
    "query_heads_gone",
    "one_unit_left",
    "empty_attention",
    "empty_ffn",
)
SHAPES = ((2, 8), (3, 13))


@functools.cache
@pytest.fixture(autouse=True)
def no_file_outside_the_test(tmp_path_factory, monkeypatch):
    """The passes are pure: every test here runs with HOME and GRAINFX_CACHE pointing to empty
    folders and leaves them empty."""
    home, cache = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GRAINFX_CACHE", str(cache))
    yield
    assert not list(home.iterdir()) and not list(cache.iterdir()), "a pass wrote a file"


def per_call_cost(hidden: int, heads: int, q_width: int, v_width: int) -> float:
    """A cost model: a fixed price per attention call plus the padded width of its heads."""
    return 16.0 + heads * (q_width + v_width)


def masked(arch: str):
    return passes.instrument(captured(arch), structure(arch))


def draw_masks(
    struct: passes.Structure, kind: str, seed: int, keep: float
) -> dict[str, torch.Tensor]:
    """Binary masks of one kind; ``keep`` is the share kept where the kind is random.

    whole_heads_zero: whole key/value heads (groups) gone; value_only_heads: heads without
    query units; query_heads_gone: query heads gone inside their group (GQA); one_unit_left:
    one query unit (a rotary pair, under RoPE) left in every head.
    """
    gen = torch.Generator().manual_seed(seed)
    masks = {
        name: (torch.rand(size, generator=gen) < keep).float()
        for name, size in struct.mask_shapes().items()
    }
    if kind == "ones":
        return struct.ones()
    block = struct.attention[seed % len(struct.attention)]
    names = block.mask_names()
    vo = masks[names["vo"]]
    qk = masks[names["qk"]] if "qk" in names else torch.ones(block.qk_shape)
    heads = torch.randperm(vo.shape[0], generator=gen)[: 1 + seed % max(1, vo.shape[0] - 1)]
    if kind == "whole_heads_zero":
        qk[heads], vo[heads] = 0, 0
    elif kind == "value_only_heads":
        qk[heads], vo[heads] = 0, 1
    elif kind == "query_only_heads":
        qk[heads], vo[heads] = 1, 0
    elif kind == "query_heads_gone" and "heads" in names:
        gone = torch.randperm(block.num_heads, generator=gen)[: 1 + seed % (block.num_heads - 1)]
        vo.fill_(1)
        masks[names["heads"]].fill_(1)
        masks[names["heads"]][gone] = 0
    elif kind == "one_unit_left":
        qk.zero_()
        qk[
            torch.arange(qk.shape[0]), torch.randint(0, qk.shape[1], (qk.shape[0],), generator=gen)
        ] = 1
        vo.fill_(1)
    elif kind == "empty_attention":
        qk.zero_(), vo.zero_()
    elif kind == "empty_ffn":
        masks[struct.ffn[seed % len(struct.ffn)].name].zero_()
    return masks


def assert_close(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-6)
        err = ((expected[name] - actual[name]).abs().max() / scale).item()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
    keep=st.floats(0.0, 1.0),
    bucket=st.sampled_from([1, 3, 8, "auto"]),
)
def test_compact_equals_masked_graph(arch, kind, seed, keep, bucket):
    struct, graph = structure(arch), masked(arch)
    masks = draw_masks(struct, kind, seed, keep)
    passes.set_masks(graph, masks)
    compact = passes.rewrite(graph, struct, bucket=bucket, cost=per_call_cost)
    with torch.no_grad():
        for batch, seq in SHAPES:
            inputs = example_inputs(arch, batch, seq, seed=seed)
            assert_close(graph(**inputs), compact(**inputs))
    assert sum(p.numel() for p in compact.parameters()) == struct.count_params(masks)


@pytest.mark.parametrize(
    "arch", ["bert-sdpa", "gpt2-eager", "llama-sdpa", "qwen3-eager", "gptj-sdpa"]
)
def test_all_ones_keeps_every_parameter_and_the_model_outputs(arch):
    struct, graph = structure(arch), masked(arch)
    passes.set_masks(graph, struct.ones())
    compact = passes.rewrite(graph, struct)
    inputs = example_inputs(arch, 3, 11)
    with torch.no_grad():
        expected = model(arch)(**inputs).logits
        assert_close({"logits": expected}, {"logits": compact(**inputs)["logits"]})
    assert sum(p.numel() for p in compact.parameters()) == struct.total_params


def sdpa_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default)


def unequal_heads(arch: str = "bert-eager"):
    """The structure and masked graph of ``arch`` with heads of 1, 2, 5 and 8 query and value
    dims in every layer."""
    struct, graph = structure(arch), masked(arch)
    masks = struct.ones()
    for block in struct.attention:
        for h, n in enumerate([1, 2, 5, 8]):
            masks[f"{block.name}.qk"][h, n:] = 0
            masks[f"{block.name}.vo"][h, n:] = 0
    passes.set_masks(graph, masks)
    return struct, graph


def test_unequal_heads_run_as_buckets_of_padded_size():
    arch = "bert-eager"
    struct, graph = unequal_heads(arch)
    layers = len(struct.attention)
    assert sdpa_count(passes.rewrite(graph, struct, bucket=1)) == 4 * layers
    assert sdpa_count(passes.rewrite(graph, struct, bucket=4)) == 2 * layers
    assert sdpa_count(passes.rewrite(graph, struct, bucket=8)) == 1 * layers
    inputs = example_inputs(arch, 2, 8)
    with torch.no_grad():
        for bucket in (1, 4, 8):
            assert_close(graph(**inputs), passes.rewrite(graph, struct, bucket=bucket)(**inputs))


@pytest.mark.parametrize("merge", [True, False])
def test_projections_reading_one_input_are_one_matmul(merge):
    arch = "llama-sdpa"  # per layer: Q, K, V; O; gate, up; down
    struct, graph = structure(arch), masked(arch)
    passes.set_masks(graph, draw_masks(struct, "random", 3, 0.7))
    compact = passes.rewrite(graph, struct, merge_projections=merge)
    linears = sum(1 for n in compact.graph.nodes if n.target is aten.linear.default)
    per_layer = 4 if merge else 7
    assert linears == per_layer * len(struct.attention) + 1  # + the LM head
    inputs = example_inputs(arch, 2, 8)
    with torch.no_grad():
        assert_close(graph(**inputs), compact(**inputs))


def test_dead_attention_and_dropout_nodes_are_removed():
    arch = "distilbert-sdpa"
    struct, graph = structure(arch), masked(arch)
    masks = struct.ones()
    masks["attn0.qk"].zero_(), masks["attn0.vo"].zero_()
    passes.set_masks(graph, masks)
    compact = passes.rewrite(graph, struct)
    assert sdpa_count(compact) == len(struct.attention) - 1
    for node in compact.graph.nodes:
        if node.op not in ("output", "placeholder") and not passes.graph.is_impure(node):
            assert node.users, f"dead node {node.name} left in the compact graph"
    assert not any(name.startswith("grain_masks") for name, _ in compact.named_buffers())


def test_rewrite_leaves_the_masked_graph_unchanged():
    arch = "gpt2-sdpa"
    struct, graph = structure(arch), masked(arch)
    masks = draw_masks(struct, "random", 3, 0.5)
    passes.set_masks(graph, masks)
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    code = graph.code
    passes.rewrite(graph, struct)
    assert graph.code == code
    after = graph.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kept_structure_is_recorded():
    arch = "bert-sdpa"
    struct, graph = structure(arch), masked(arch)
    masks = draw_masks(struct, "value_only_heads", 5, 0.5)
    passes.set_masks(graph, masks)
    kept = passes.rewrite(graph, struct).grainfx_kept
    assert len(kept.layers) == len(struct.attention)
    layer0 = kept.layers[0]
    assert layer0.ffn == int(masks["ffn0"].sum())
    assert [h.value for h in layer0.heads] == [int(r.sum()) for r in masks["attn0.vo"] if r.any()]
    assert kept.density == pytest.approx(struct.density(masks))
    assert passes.KeptStructure.from_json(kept.to_json()) == kept


def test_rewrite_of_a_graph_without_masks_is_refused():
    arch = "bert-sdpa"
    with pytest.raises(passes.NotInstrumentedError, match="instrument"):
        passes.rewrite(captured(arch), structure(arch))


def test_rewrite_refuses_masks_that_are_not_binary():
    arch = "bert-sdpa"
    graph = passes.instrument(captured(arch), structure(arch))
    with torch.no_grad():
        mask_buffers(graph)["attn1.vo"][2, 3] = 0.5
    with pytest.raises(passes.MaskError, match=r"attn1\.vo.*0\.5.*binary"):
        passes.rewrite(graph, structure(arch))


def test_rewrite_refuses_masks_of_the_wrong_shape():
    arch = "bert-sdpa"
    graph = passes.instrument(captured(arch), structure(arch))
    graph.grain_masks.register_buffer("ffn1", torch.ones(7))
    with pytest.raises(passes.MaskError, match=r"ffn1.*shape \(7,\).*\(64,\)"):
        passes.rewrite(graph, structure(arch))


def test_rewrite_refuses_a_train_mode_graph():
    arch = "bert-sdpa"
    _, train = passes.capture_pair(model(arch), example_inputs(arch))
    graph = passes.instrument(train, passes.discover(train))
    with pytest.raises(passes.TrainingGraphError, match="eval"):
        passes.rewrite(graph, passes.discover(train))


def test_bucket_option_is_validated():
    with pytest.raises(ValueError, match="bucket"):
        passes.RewriteOptions(bucket=0)
    with pytest.raises(ValueError, match="'auto'"):
        passes.RewriteOptions(bucket="fastest")
    with pytest.raises(ValueError, match="shape"):
        passes.RewriteOptions(shape=(8,))


def test_auto_bucket_needs_a_cost_model():
    struct, graph = unequal_heads()
    with pytest.raises(ValueError, match="cost model: pass cost="):
        passes.rewrite(graph, struct, bucket="auto")


def test_auto_bucket_is_chosen_per_layer_and_recorded():
    struct, graph = unequal_heads()
    compact = passes.rewrite(graph, struct, cost=per_call_cost, shape=(2, 8))
    kept = compact.grainfx_kept
    assert kept.bucket == "auto" and kept.bucket_shape == (2, 8)
    for layer in kept.layers:
        chosen = layer.bucket
        assert chosen in {1, 2, 4, struct.attention[0].head_dim}
        fixed = passes.rewrite(graph, struct, bucket=chosen)
        assert fixed.grainfx_kept.layers[layer.layer].bucket == chosen
    assert sdpa_count(compact) == sum({1: 4, 2: 3, 4: 2}.get(x.bucket, 1) for x in kept.layers)


class _MatmulProjections(torch.nn.Module):
    """A pre-norm block whose projections are ``x @ W.T`` without bias (Falcon's
    FalconLinear) and whose FFN output is added to the attention output in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        names = {
            "q": (16, 16),
            "k": (16, 16),
            "v": (16, 16),
            "o": (16, 16),
            "up": (32, 16),
            "down": (16, 32),
        }
        for name, size in names.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(size) * 0.3))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = ((h @ w.T).view(b, t, 2, 8).transpose(1, 2) for w in (self.q, self.k, self.v))
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = ctx.transpose(1, 2).reshape(b, t, 16) @ self.o.T
        mlp = torch.relu(h @ self.up.T) @ self.down.T
        mlp += attn
        return {"out": x + mlp}


@functools.cache
def _matmul_projections():
    gm = passes.capture(_MatmulProjections().eval(), {"x": torch.randn(2, 5, 16)})
    struct = passes.discover(gm)
    return struct, passes.instrument(gm, struct)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0))
def test_x_at_w_transposed_projections_are_pruned_exactly(seed, keep):
    struct, graph = _matmul_projections()
    assert len(struct.attention) == 1 and len(struct.ffn) == 1 and struct.uncovered == ()
    masks = draw_masks(struct, "random", seed, keep)
    passes.set_masks(graph, masks)
    compact = passes.rewrite(graph, struct)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(graph(x=x), compact(x=x))
    assert sum(p.numel() for p in compact.parameters()) == struct.count_params(masks)


@functools.cache
def _disentangled():
    from tests.passes.test_batch_heads import DisentangledScores

    gm = passes.capture(DisentangledScores().eval(), {"x": torch.randn(2, 5, 16)})
    struct = passes.discover(gm)
    return struct, passes.instrument(gm, struct)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(kind=st.sampled_from(KINDS[:-1]), seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0))
def test_a_content_to_position_term_alone_is_pruned_exactly(kind, seed, keep):
    struct, graph = _disentangled()
    masks = draw_masks(struct, kind, seed, keep)
    passes.set_masks(graph, masks)
    compact = passes.rewrite(graph, struct, bucket=1 + seed % 8)
    for batch in (2, 3):
        x = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert_close(graph(x=x), compact(x=x))
    assert sum(p.numel() for p in compact.parameters()) == struct.count_params(masks)


#: Architectures whose heads without query units run as a mean of their values in every
#: block: bidirectional and causal, sdpa and eager, a padding mask or none, GQA, a scale
#: dividing the scores in place (Falcon), encoder, decoder and cross attention (BART).
QUERY_LESS = [
    "bert-sdpa",
    "bert-eager",
    "gpt2-sdpa",
    "gpt2-eager",
    "llama-sdpa",
    "llama-eager",
    "vit-sdpa",
    "bart-sdpa",
    "falcon-eager",
]
#: Blocks that run them as means where the model mixes them with blocks that keep the scores:
#: T5's self attention has a relative position bias (its cross attention none); Gemma 2's
#: first layer a sliding window (its second soft-caps the scores: tanh(0) = 0).
QUERY_LESS_MIXED = {
    "t5-sdpa": [False, False, False, True, False, True],
    "gemma2-eager": [False, True],
}
#: Architectures that keep the scores for them everywhere: a sliding window (Mistral), a
#: relative position bias (T5 eager: the cross attention's zero bias is added to the mask),
#: ALiBi (BLOOM), disentangled relative-position terms (DeBERTa).
QUERY_LESS_SCORED = [
    "mistral-sdpa",
    "t5-eager",
    "bloom-eager",
    "deberta_v2-eager",
    "deberta_v3-eager",
]


def query_less_masks(struct: passes.Structure, seed: int, keep: float) -> dict[str, torch.Tensor]:
    """Random masks in which every block has heads with value units and no query units."""
    gen = torch.Generator().manual_seed(seed)
    masks = draw_masks(struct, "random", seed, keep)
    for block in struct.attention:
        names = block.mask_names()
        heads = torch.randperm(block.kv_heads, generator=gen)[: 1 + seed % block.kv_heads]
        masks[names["qk"]][heads] = 0
        masks[names["vo"]][heads[0], 0] = 1
        if "heads" in names:  # a live query head in the group
            masks[names["heads"]][heads[0] * block.group_size] = 1
    return masks


def without_padding(arch: str, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    inputs = example_inputs(arch, batch, seq, seed=seed)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs


@pytest.mark.parametrize("arch", QUERY_LESS + list(QUERY_LESS_MIXED) + QUERY_LESS_SCORED)
@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0), padded=st.booleans())
def test_heads_without_query_units_are_a_mean_of_their_values(arch, seed, keep, padded):
    struct, graph = structure(arch), masked(arch)
    masks = query_less_masks(struct, seed, keep)
    passes.set_masks(graph, masks)
    compact = passes.rewrite(graph, struct, bucket=1 + seed % 4)
    layers = compact.grainfx_kept.layers
    flagged = [[h for h in layer.heads if h.query_less_mean] for layer in layers]
    assert all(h.query == 0 and h.value > 0 for heads in flagged for h in heads)
    expected = QUERY_LESS_MIXED.get(arch, [arch in QUERY_LESS] * len(layers))
    assert [bool(heads) for heads in flagged] == expected
    means = [n for n in compact.graph.nodes if "query_less_mean" in n.name]
    assert len(means) == sum(expected)
    make = example_inputs if padded else without_padding
    with torch.no_grad():
        for batch, seq in SHAPES:
            inputs = make(arch, batch, seq, seed=seed)
            assert_close(graph(**inputs), compact(**inputs))
    assert sum(p.numel() for p in compact.parameters()) == struct.count_params(masks)


@pytest.mark.parametrize("arch", ["bert-sdpa", "bert-eager", "gpt2-sdpa", "gpt2-eager"])
def test_a_query_that_sees_no_key_gets_what_the_masked_model_gives(arch):
    """A fully padded row: sdpa gives zeros, a softmax over a finite masked value the mean of
    every value; left padding leaves causal queries with no key at all."""
    struct, graph = structure(arch), masked(arch)
    masks = struct.ones()
    for block in struct.attention:
        masks[block.mask_names()["qk"]].zero_()
    passes.set_masks(graph, masks)
    compact = passes.rewrite(graph, struct)
    inputs = example_inputs(arch, 3, 7)
    inputs["attention_mask"][1] = 0
    inputs["attention_mask"][2, :3] = 0
    with torch.no_grad():
        expected, actual = graph(**inputs), compact(**inputs)
    assert not any(torch.isnan(t).any() for t in expected.values())
    assert_close(expected, actual)
    assert sdpa_count(compact) == 0
