"""passes.instrument: masks multiplied into every block, all ones = the captured graph."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.capture import capture_pair
from passes.discover import discover
from passes.errors import MaskError, NotInstrumentedError, PassError, StructureMismatchError
from passes.instrument import get_masks, instrument, mask_buffers, record_mask_grads, set_masks
from tests.captures import captured, model, pair, structure
from tests.models import ARCHITECTURES, HEAD_DIM, HEADS, HIDDEN, LAYERS, build, example_inputs


@functools.cache
def masked(arch: str):
    """An instrumented copy of the cached graph; tests restore its masks to one."""
    return instrument(captured(arch), structure(arch))


@pytest.fixture
def fresh():
    """A freshly instrumented BERT graph that a test may change."""
    arch = "bert-sdpa"
    return arch, instrument(captured(arch), structure(arch))


def _logits(gm, inputs):
    with torch.no_grad():
        return gm(**inputs)["logits"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masks_at_one_give_the_captured_outputs_exactly(arch):
    gm = masked(arch)
    assert get_masks(gm).keys() == structure(arch).mask_shapes().keys()
    for batch, seq in [(2, 8), (3, 11)]:
        inputs = example_inputs(arch, batch, seq, seed=4)
        assert torch.equal(_logits(gm, inputs), _logits(captured(arch), inputs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zero_masks_change_outputs(arch):
    gm = instrument(captured(arch), structure(arch))
    inputs = example_inputs(arch)
    reference = _logits(gm, inputs)
    for name, size in structure(arch).mask_shapes().items():
        set_masks(gm, {name: torch.zeros(size)})
        assert not torch.allclose(_logits(gm, inputs), reference), name
        set_masks(gm, {name: torch.ones(size)})
    assert torch.equal(_logits(gm, inputs), reference)


def test_masks_are_buffers_that_require_grad(fresh):
    arch, gm = fresh
    buffers = mask_buffers(gm)
    assert buffers.keys() == structure(arch).mask_shapes().keys()
    for name, buf in buffers.items():
        assert buf.shape == structure(arch).mask_shapes()[name]
        assert buf.requires_grad
        assert torch.equal(buf, torch.ones_like(buf))
    assert not any(buf is p for p in gm.parameters() for buf in buffers.values())


def _params_of(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters())


def _prune_bert(m, masks):
    """Zero the weight rows that the masks remove, in a copy of a BERT model."""
    m = copy.deepcopy(m)
    p = _params_of(m)
    with torch.no_grad():
        for i in range(LAYERS):
            pre = f"bert.encoder.layer.{i}."
            qk = masks[f"attn{i}.qk"].flatten()
            vo = masks[f"attn{i}.vo"].flatten()
            ffn = masks[f"ffn{i}"]
            for name, keep in [
                ("attention.self.query", qk),
                ("attention.self.value", vo),
                ("intermediate.dense", ffn),
            ]:
                p[pre + name + ".weight"].mul_(keep[:, None])
                p[pre + name + ".bias"].mul_(keep)
    return m


def _prune_gpt2(m, masks):
    """The same for GPT-2, whose Conv1D weights are stored (in, out) and Q, K, V fused."""
    m = copy.deepcopy(m)
    p = _params_of(m)
    with torch.no_grad():
        for i in range(LAYERS):
            pre = f"transformer.h.{i}."
            qkv = torch.cat(
                [masks[f"attn{i}.qk"].flatten(), torch.ones(HIDDEN), masks[f"attn{i}.vo"].flatten()]
            )
            for name, keep in [("attn.c_attn", qkv), ("mlp.c_fc", masks[f"ffn{i}"])]:
                p[pre + name + ".weight"].mul_(keep[None, :])
                p[pre + name + ".bias"].mul_(keep)
    return m


@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from(["bert-eager", "bert-sdpa", "gpt2-eager", "gpt2-sdpa"]), data=st.data())
def test_binary_masks_equal_zeroed_weight_rows(arch, data):
    """A zero in a mask is exactly the removal of its unit: zeroed Q / V / up rows."""
    gm = masked(arch)
    masks = {}
    for name, size in structure(arch).mask_shapes().items():
        bits = data.draw(st.lists(st.booleans(), min_size=size.numel(), max_size=size.numel()))
        masks[name] = torch.tensor(bits, dtype=torch.float32).reshape(size)
    prune = _prune_gpt2 if arch.startswith("gpt2") else _prune_bert
    inputs = example_inputs(arch, 2, 7, seed=5)
    try:
        set_masks(gm, masks)
        with torch.no_grad():
            expected = prune(model(arch), masks)(**inputs).logits
        torch.testing.assert_close(_logits(gm, inputs), expected, rtol=1e-5, atol=1e-5)
    finally:
        set_masks(gm, structure(arch).ones())


def _loss(gm, inputs):
    return gm(**inputs)["logits"].square().sum()


def test_record_mask_grads_inside_the_context_only(fresh):
    arch, gm = fresh
    inputs = example_inputs(arch)
    buffers = mask_buffers(gm)
    expected = torch.autograd.grad(_loss(gm, inputs), list(buffers.values()))
    expected = dict(zip(buffers, expected, strict=True))

    _loss(gm, inputs).backward()  # before the context: not recorded
    with record_mask_grads(gm) as grads:
        assert dict(grads) == {}
        _loss(gm, inputs).backward()
    assert grads.keys() == buffers.keys()
    for name, grad in grads.items():
        assert grad.shape == buffers[name].shape
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name])
    recorded = {k: v.clone() for k, v in grads.items()}

    _loss(gm, inputs).backward()  # after the context: adds nothing
    assert grads.keys() == recorded.keys()
    assert all(torch.equal(grads[k], recorded[k]) for k in recorded)


def test_record_mask_grads_sums_backwards_inside_and_separates_losses(fresh):
    arch, gm = fresh
    inputs = example_inputs(arch)
    out = gm(**inputs)["logits"]
    first, second = out.square().sum(), out.sum()
    buffers = mask_buffers(gm)
    only_first = dict(
        zip(
            buffers,
            torch.autograd.grad(first, list(buffers.values()), retain_graph=True),
            strict=True,
        )
    )
    with record_mask_grads(gm) as grads:
        first.backward(retain_graph=True)
    second.backward(retain_graph=True)
    for name in buffers:
        torch.testing.assert_close(grads[name], only_first[name])

    with record_mask_grads(gm) as twice:
        first.backward(retain_graph=True)
        first.backward()
    for name in buffers:
        torch.testing.assert_close(twice[name], 2 * only_first[name])


def test_set_masks_checks_names_and_shapes(fresh):
    arch, gm = fresh
    shapes = structure(arch).mask_shapes()
    with pytest.raises(MaskError, match="attn0.qk"):
        set_masks(gm, {"attn0.qk": torch.zeros(HEAD_DIM, HEADS)})
    with pytest.raises(MaskError, match="attn9.qk"):
        set_masks(gm, {"attn9.qk": torch.zeros(shapes["attn0.qk"])})
    with pytest.raises(MaskError):
        set_masks(gm, {"attn0__qk": torch.zeros(shapes["attn0.qk"])})
    # Nothing is applied when one entry is wrong.
    with pytest.raises(MaskError):
        set_masks(gm, {"ffn0": torch.zeros(shapes["ffn0"]), "ffn1": torch.zeros(3)})
    assert all(torch.equal(m, torch.ones_like(m)) for m in get_masks(gm).values())
    # A subset is fine, and values are copied, not aliased.
    value = torch.full(shapes["ffn1"], 0.5)
    set_masks(gm, {"ffn1": value})
    value.fill_(0.25)
    assert torch.equal(get_masks(gm)["ffn1"], torch.full(shapes["ffn1"], 0.5))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["attn0.qk", "attn1.vo", "ffn0"]),
    dims=st.lists(st.integers(0, 9), min_size=0, max_size=3),
)
def test_set_masks_rejects_every_wrong_shape(name, dims):
    gm = masked("bert-eager")
    right = structure("bert-eager").mask_shapes()[name]
    if torch.Size(dims) == right:
        return
    with pytest.raises(MaskError):
        set_masks(gm, {name: torch.zeros(dims)})
    assert torch.equal(get_masks(gm)[name], torch.ones(right))


def test_mask_functions_need_an_instrumented_graph():
    gm = captured("bert-sdpa")
    with pytest.raises(NotInstrumentedError):
        set_masks(gm, structure("bert-sdpa").ones())
    with pytest.raises(NotInstrumentedError):
        get_masks(gm)
    with pytest.raises(NotInstrumentedError):
        with record_mask_grads(gm):
            pass
    assert issubclass(NotInstrumentedError, PassError)


def test_instrument_does_not_change_the_input_graph():
    arch = "gpt2-eager"
    gm = captured(arch)
    code, nodes = gm.code, len(gm.graph.nodes)
    params = dict(gm.named_parameters())
    inputs = example_inputs(arch)
    before = _logits(gm, inputs)
    new = instrument(gm, structure(arch))
    set_masks(new, {k: torch.zeros(v) for k, v in structure(arch).mask_shapes().items()})
    assert gm.code == code and len(gm.graph.nodes) == nodes
    assert not hasattr(gm, "grain_masks")
    assert dict(gm.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert torch.equal(_logits(gm, inputs), before)
    # The instrumented copy shares the parameters.
    new_params = dict(new.named_parameters())
    assert all(new_params[n] is p for n, p in params.items())


@pytest.mark.parametrize("arch", ["bert-sdpa", "gpt2-sdpa", "vit-eager"])
def test_train_graph_is_instrumented_with_its_own_structure(arch):
    """Node names differ between the eval and the train graph (GPT-2 sdpa): each graph is
    discovered on its own, and the two structures have the same masks."""
    eval_gm, train_gm = pair(arch)
    train_structure = discover(train_gm)
    assert train_structure.mask_shapes() == discover(eval_gm).mask_shapes()
    masked = instrument(train_gm, train_structure)
    assert set(mask_buffers(masked)) == set(train_structure.mask_shapes())


def test_a_structure_from_another_graph_is_refused():
    eval_gm, train_gm = pair("gpt2-sdpa")
    with pytest.raises(StructureMismatchError, match="discover"):
        instrument(train_gm, discover(eval_gm))
    with pytest.raises(StructureMismatchError, match="only fits the graph"):
        instrument(captured("bert-sdpa"), structure("gpt2-sdpa"))


def test_instrumenting_twice_is_refused():
    masked = instrument(captured("bert-sdpa"), structure("bert-sdpa"))
    with pytest.raises(MaskError, match="instrumented already"):
        instrument(masked, structure("bert-sdpa"))


def test_train_and_eval_graphs_share_masks():
    arch = "electra-sdpa"
    m = build(arch)
    inputs = example_inputs(arch)
    eval_gm, train_gm = capture_pair(m, inputs)
    s = discover(eval_gm)
    eval_masked = instrument(eval_gm, s)
    train_masked = instrument(train_gm, discover(train_gm), masks=mask_buffers(eval_masked))
    for name, buf in mask_buffers(train_masked).items():
        assert buf is mask_buffers(eval_masked)[name]
    set_masks(eval_masked, {"ffn1": torch.zeros(s.mask_shapes()["ffn1"])})
    assert torch.equal(get_masks(train_masked)["ffn1"], torch.zeros(s.mask_shapes()["ffn1"]))
    with record_mask_grads(train_masked) as grads:
        _loss(train_masked, inputs).backward()
    assert grads.keys() == s.mask_shapes().keys()
    with pytest.raises(MaskError):
        ones = torch.ones(s.mask_shapes()["ffn0"])
        instrument(train_gm, discover(train_gm), masks={"ffn0": ones})
    with pytest.raises(MaskError):
        bad = dict(mask_buffers(eval_masked))
        bad["ffn0"] = torch.ones(3)
        instrument(train_gm, s, masks=bad)


@pytest.mark.parametrize("arch", ["deberta_v2-eager", "deberta_v3-eager"])
def test_a_query_unit_of_disentangled_attention_is_its_rows_in_every_use(arch):
    """Masking query unit (h, j) equals zeroing row j of head h in W_Q and W_K (and in the
    position projections of their own) everywhere: content and relative-position terms."""
    struct = structure(arch)
    (block,) = (b for b in struct.attention if b.name == "attn0")
    assert [t.content for t in block.relative] == ["q", "k"]
    graph = instrument(captured(arch), struct)
    masks = struct.ones()
    masks["attn0.qk"][1, 3] = 0
    masks["attn0.qk"][2, :] = 0
    set_masks(graph, masks)
    reference = copy.deepcopy(model(arch))
    attention = next(
        m for n, m in reference.named_modules() if n.endswith("layer.0.attention.self")
    )
    names = ("query_proj", "key_proj", "pos_key_proj", "pos_query_proj")
    projections = [getattr(attention, n) for n in names if hasattr(attention, n)]
    assert len(projections) == (2 if arch.startswith("deberta_v3") else 4)
    rows = [block.head_dim + 3] + list(range(2 * block.head_dim, 3 * block.head_dim))
    with torch.no_grad():
        for linear in projections:
            linear.weight[rows] = 0
            linear.bias[rows] = 0
        inputs = example_inputs(arch, 3, 11)
        expected, actual = reference(**inputs), graph(**inputs)
        dense = model(arch)(**inputs)
    key = next(iter(actual))
    torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(actual[key], dense[key], atol=1e-3)
