"""passes.discover: attention blocks, FFN blocks, layer outputs and units of a captured graph."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.capture import capture
from passes.discover import discover
from passes.errors import NoAttentionFoundError
from passes.graph import attr_tensor
from tests.captures import captured, pair, structure
from tests.models import (
    ALL_ARCHITECTURES,
    ARCHITECTURES,
    FFN_WIDTH,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    LAYERS,
    split,
)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_heads_and_ffn_width(arch):
    family, impl = split(arch)
    s = structure(arch)
    assert len(s.attention) == LAYERS
    assert len(s.ffn) == LAYERS
    assert [b.name for b in s.attention] == [f"attn{i}" for i in range(LAYERS)]
    assert [b.name for b in s.ffn] == [f"ffn{i}" for i in range(LAYERS)]
    for block in s.attention:
        assert (block.num_heads, block.head_dim) == (HEADS, HEAD_DIM)
        assert block.kind == impl
        assert block.kv_heads == HEADS and not block.rope
        assert block.scale == pytest.approx(HEAD_DIM**-0.5)
        assert (
            block.is_causal or block.attn_mask is not None or block.score_biases or family == "vit"
        )
    for block in s.ffn:
        assert block.width == FFN_WIDTH[family]
        assert block.gate is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mask_shapes_and_unit_sizes(arch):
    family, _ = split(arch)
    s = structure(arch)
    shapes = s.mask_shapes()
    expected = {}
    for i in range(LAYERS):
        expected[f"attn{i}.qk"] = torch.Size([HEADS, HEAD_DIM])
        expected[f"attn{i}.vo"] = torch.Size([HEADS, HEAD_DIM])
    for i in range(LAYERS):
        expected[f"ffn{i}"] = torch.Size([FFN_WIDTH[family]])
    assert shapes == expected
    sizes = {g.kind: set() for g in s.units()}
    for group in s.units():
        sizes[group.kind].add(group.unit_params)
    # W_Q and W_K rows with biases; W_V row with bias and W_O column; up row with bias and
    # down column.
    assert sizes == {"query": {2 * HIDDEN + 2}, "value": {2 * HIDDEN + 1}, "ffn": {2 * HIDDEN + 1}}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_totals(arch):
    s = structure(arch)
    gm = captured(arch)
    assert s.total_params == sum(p.numel() for p in gm.parameters())
    per_layer = (
        HEADS * HEAD_DIM * (2 * HIDDEN + 2)
        + HEADS * HEAD_DIM * (2 * HIDDEN + 1)
        + FFN_WIDTH[split(arch)[0]] * (2 * HIDDEN + 1)
    )
    assert s.unit_params == LAYERS * per_layer
    ones = s.ones()
    assert s.density(ones) == 1.0
    assert s.count_params(ones) == s.total_params
    zeros = {k: torch.zeros_like(v) for k, v in ones.items()}
    assert s.density(zeros) == 0.0
    assert s.count_params(zeros) == s.total_params - s.unit_params


def _draw_masks(data, s):
    masks = {}
    for name, size in s.mask_shapes().items():
        bits = data.draw(st.lists(st.booleans(), min_size=size.numel(), max_size=size.numel()))
        masks[name] = torch.tensor(bits, dtype=torch.float32).reshape(size)
    return masks


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_count_params_is_monotone_in_the_masks(data):
    s = structure("gpt2-sdpa")
    masks = _draw_masks(data, s)
    count = s.count_params(masks)
    assert s.total_params - s.unit_params <= count <= s.total_params
    assert s.density(masks) == pytest.approx(
        (count - s.total_params + s.unit_params) / s.unit_params
    )
    name = data.draw(st.sampled_from(sorted(masks)))
    more = dict(masks)
    more[name] = masks[name].clone().flatten()
    more[name][data.draw(st.integers(0, more[name].numel() - 1))] = 1.0
    more[name] = more[name].reshape(masks[name].shape)
    assert s.count_params(more) >= count


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_head_without_value_units_keeps_no_query_units(data):
    s = structure("bert-eager")
    masks = _draw_masks(data, s)
    block = s.attention[0]
    head = data.draw(st.integers(0, block.num_heads - 1))
    masks[f"{block.name}.vo"][head] = 0.0
    with_qk = dict(masks)
    with_qk[f"{block.name}.qk"] = masks[f"{block.name}.qk"].clone()
    with_qk[f"{block.name}.qk"][head] = 1.0
    without_qk = dict(masks)
    without_qk[f"{block.name}.qk"] = masks[f"{block.name}.qk"].clone()
    without_qk[f"{block.name}.qk"][head] = 0.0
    assert s.count_params(with_qk) == s.count_params(without_qk)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_outputs(arch):
    s = structure(arch)
    gm = captured(arch)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert len(s.layer_outputs) == LAYERS + 1
    assert len(set(s.layer_outputs)) == LAYERS + 1
    for name in s.layer_outputs:
        val = nodes[name].meta["val"]
        assert val.shape[-1] == HIDDEN and val.dim() == 3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_str_mentions_blocks_heads_and_widths(arch):
    family, _ = split(arch)
    text = str(structure(arch))
    assert f"{LAYERS} attention blocks" in text
    assert f"{LAYERS} FFN blocks" in text
    assert f"{HEADS} x {HEAD_DIM}" in text
    assert str(FFN_WIDTH[family]) in text
    assert f"{structure(arch).total_params:,}" in text
    for i in range(LAYERS):
        assert f"layer {i}" in text


@pytest.mark.parametrize(
    "arch", ["bert-sdpa", "distilbert-eager", "gpt2-eager", "gpt2-sdpa", "vit-sdpa"]
)
def test_train_graph_has_the_same_structure(arch):
    """Dropout is live in the train graph: discover sees through it."""
    eval_gm, train_gm = pair(arch)
    assert discover(train_gm).mask_shapes() == discover(eval_gm).mask_shapes()
    assert discover(train_gm).unit_params == discover(eval_gm).unit_params


def test_discover_does_not_change_the_graph():
    gm = captured("gpt2-eager")
    before = gm.code
    discover(gm)
    assert gm.code == before


def test_discover_is_deterministic():
    assert discover(captured("roberta-eager")) == structure("roberta-eager")


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return {"y": x + self.down(torch.relu(self.up(x)))}


def test_mlp_only_model_has_no_attention():
    gm = capture(_MLP(), {"x": torch.randn(2, 5, 8)})
    with pytest.raises(NoAttentionFoundError):
        discover(gm)


@pytest.mark.parametrize(
    "arch,kv,rope,pairs,query_units",
    [
        ("llama-sdpa", 2, "half", 8, True),
        ("llama_mha-eager", 4, "half", 8, True),
        ("qwen3-sdpa", 2, "half", 12, False),
        ("phi3-eager", 2, "half", 8, True),
        ("gptj-sdpa", 4, "interleaved", 4, True),
        ("neox-eager", 4, "half", 4, True),
        ("modernbert-sdpa", 4, "half", 8, True),
    ],
)
def test_rope_gqa_and_head_norm_are_recognized(arch, kv, rope, pairs, query_units):
    s = structure(arch)
    for block in s.attention:
        assert block.kv_heads == kv and block.rope.layout == rope
        assert block.rotary_dims // 2 == pairs
        assert block.has_query_units == query_units
        assert ("heads" in block.mask_names()) == (kv < block.num_heads)
    assert len(s.ffn) == len(s.attention)
    if not query_units:
        assert "query units not offered" in str(s)


@pytest.mark.parametrize("arch", ["llama-sdpa", "phi3-sdpa", "qwen2-eager"])
def test_gated_ffn_units_hold_up_gate_and_down(arch):
    s = structure(arch)
    for block in s.ffn:
        assert block.gate is not None
        assert block.unit_params == 3 * 64 + (0 if block.up.bias is None else 2)


def test_unit_parameters_add_up_to_the_projections():
    s = structure("llama-sdpa")
    gm = captured("llama-sdpa")
    projections = {p.weight for b in s.attention for p in (b.q, b.k, b.v, b.o)}
    projections |= {p.weight for b in s.ffn for p in (b.up, b.gate, b.down)}
    assert s.unit_params == sum(attr_tensor(gm, w).numel() for w in projections)


def test_soft_capped_scores_are_replayed_and_post_norms_are_followed():
    s = structure("gemma2-eager")
    nodes = {n.name: n for n in captured("gemma2-eager").graph.nodes}
    for block in s.attention:
        ops = [nodes[name].target for name in block.score_ops]
        assert torch.ops.aten.tanh.default in ops and not block.score_biases
        assert block.scale == pytest.approx(1.0)  # the chain holds the scale
        assert block.head_dim == 24 and block.kv_heads == 2
    assert len(s.ffn) == 2 and all(b.gate is not None for b in s.ffn)
    assert len(s.layer_outputs) == 3
    assert "replays per bucket" in str(s)


class _ReshapedScores(torch.nn.Module):
    """Attention whose scores are reshaped to (batch * heads, seq, seq) before the softmax."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2)).reshape(b * 2, t, t)
        probs = scores.softmax(-1).reshape(b, 2, t, t)
        return {"out": self.o((probs @ v).transpose(1, 2).reshape(b, t, 16))}


def test_scores_through_a_non_elementwise_op_are_refused_naming_the_node():
    from passes.errors import UnsupportedArchitectureError

    gm = capture(_ReshapedScores().eval(), {"x": torch.randn(2, 5, 16)})
    with pytest.raises(UnsupportedArchitectureError, match=r"reshape.*not elementwise"):
        discover(gm)


def _tiny(config_cls, model_cls, **kwargs):
    config = config_cls(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        **kwargs,
    )
    torch.manual_seed(0)
    return capture(model_cls(config).eval(), {"input_ids": torch.randint(3, 99, (2, 8))})


def test_a_norm_over_the_whole_query_projection_is_refused():
    import transformers as T

    from passes.errors import UnsupportedArchitectureError

    gm = _tiny(T.Olmo2Config, T.Olmo2ForCausalLM)
    with pytest.raises(UnsupportedArchitectureError, match=r"q_norm.*whole projection"):
        discover(gm)


def test_layers_that_share_weights_are_refused():
    import transformers as T

    from passes.errors import UnsupportedArchitectureError

    gm = _tiny(T.AlbertConfig, T.AlbertModel, embedding_size=64)
    with pytest.raises(UnsupportedArchitectureError, match=r"share the weight .*ALBERT"):
        discover(gm)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_every_linear_inside_the_layers_is_covered_by_units(arch):
    s = structure(arch)
    assert s.uncovered == ()
    covered = s.covered()
    for block in s.attention:  # fused projections (one weight for Q, K and V) count once
        # (DeBERTa-v2: position projections of their own)
        assert 2 <= len(covered[block.name]) <= 4 + len(block.relative_projections)
    for block in s.ffn:
        assert len(covered[block.name]) == (
            2 if block.gate is None or block.gate.weight == block.up.weight else 3
        )
    assert "coverage: " in str(s)


class _GatedResidual(torch.nn.Module):
    """One attention block and an FFN whose output is gated by the input before it is added:
    a pattern discover does not recognise as an FFN."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
        self.up, self.down, self.gate = (
            torch.nn.Linear(16, 32),
            torch.nn.Linear(32, 16),
            torch.nn.Linear(16, 16),
        )

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, 2, 8).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(ctx.transpose(1, 2).reshape(b, t, 16))
        x = x + self.down(torch.relu(self.up(x))) * torch.sigmoid(self.gate(x))
        return {"out": x}


def test_linear_layers_no_unit_covers_are_named_in_a_warning_and_the_structure():
    from passes.errors import UncoveredLayersWarning

    gm = capture(_GatedResidual().eval(), {"x": torch.randn(2, 5, 16)})
    with pytest.warns(UncoveredLayersWarning, match=r"up\.weight.*stay whole"):
        s = discover(gm)
    assert set(s.uncovered) == {"up.weight", "down.weight", "gate.weight"}
    assert "3 linear layers inside the transformer layers are not covered" in str(s)


class _UnsplitBatchHeadScores(torch.nn.Module):
    """Attention whose scores come from ``baddbmm`` in a (batch * heads, seq, seq) layout,
    q, k and v being projections viewed as 3-d directly, not merged from a (batch, heads, seq,
    head size) split: capture cannot lift it."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b * 2, t, 8) for p in (self.q, self.k, self.v))
        bias = torch.zeros(b * 2, 1, t)
        probs = torch.baddbmm(bias, q, k.transpose(1, 2)).view(b, 2, t, t).softmax(-1)
        ctx = torch.bmm(probs.view(b * 2, t, t), v).view(b, t, 16)
        return {"out": self.o(ctx)}


def test_a_softmax_that_reads_no_score_matmul_is_named_in_the_error():
    gm = capture(_UnsplitBatchHeadScores().eval(), {"x": torch.randn(2, 5, 16)})
    with pytest.raises(
        NoAttentionFoundError, match=r"the first, at softmax.*reads aten\.view.*head merges"
    ):
        discover(gm)


@pytest.mark.parametrize(("arch", "own"), [("deberta_v3-eager", 0), ("deberta_v2-eager", 2)])
def test_disentangled_attention_has_relative_terms_and_query_units_span_both_uses(arch, own):
    s = structure(arch)
    for block in s.attention:
        assert [t.content for t in block.relative] == ["q", "k"]
        assert len(block.relative_projections) == own
        content = block.q.params_per_output() + block.k.params_per_output()
        assert block.query_unit_params == content * (1 + own // 2)
        assert block.relative_ops and block.score_ops
    # the relative position embeddings and their norm, shared by the layers, go with them all
    assert {blocks for _, blocks in s.score_params} == {("attn0", "attn1")}
    assert "relative-position terms (content-to-position, position-to-content)" in str(s)


class _ProductOfBatchTensors(torch.nn.Module):
    """Scores plus a product of the queries with another projection of the input (batch B),
    transposed: not a relative-position term."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o, self.p = (torch.nn.Linear(16, 16) for _ in range(5))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v, p = (
            lin(x).view(b, t, 2, 8).transpose(1, 2) for lin in (self.q, self.k, self.v, self.p)
        )
        scores = q @ k.transpose(-1, -2) * 0.3 + (q @ p.transpose(-1, -2)).transpose(-1, -2)
        ctx = scores.softmax(-1) @ v
        return {"out": self.o(ctx.transpose(1, 2).reshape(b, t, 16))}


def test_a_product_added_to_the_scores_that_is_no_relative_term_is_refused():
    from passes.errors import UnsupportedArchitectureError

    gm = capture(_ProductOfBatchTensors().eval(), {"x": torch.randn(2, 5, 16)})
    with pytest.raises(UnsupportedArchitectureError, match=r"add a product .*position embeddings"):
        discover(gm)
