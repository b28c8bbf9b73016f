"""passes.capture: a model and example inputs -> a plain GraphModule with the same outputs."""

from __future__ import annotations

import operator
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passes.capture import capture, capture_pair
from passes.errors import CaptureError, InvalidInputsError
from tests.captures import captured, model
from tests.models import ARCHITECTURES, build, example_inputs

TOL = dict(rtol=1e-5, atol=1e-6)


def _model_logits(arch, inputs):
    with torch.no_grad():
        return model(arch)(**inputs).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_outputs_equal_the_model_at_two_shapes(arch):
    gm = captured(arch)
    for batch, seq in [(2, 8), (3, 13)]:
        inputs = example_inputs(arch, batch, seq, seed=1)
        with torch.no_grad():
            out = gm(**inputs)
        assert out["logits"].shape == _model_logits(arch, inputs).shape
        torch.testing.assert_close(out["logits"], _model_logits(arch, inputs), **TOL)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 5), seq=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_dynamic_batch_and_sequence(batch, seq, seed):
    arch = "bert-sdpa"
    inputs = example_inputs(arch, batch, seq, seed=seed)
    with torch.no_grad():
        out = captured(arch)(**inputs)
    torch.testing.assert_close(out["logits"], _model_logits(arch, inputs), **TOL)


def test_batch_of_one_example_still_gives_a_dynamic_batch():
    arch = "gpt2-sdpa"
    gm = capture(model(arch), example_inputs(arch, 1, 8))
    inputs = example_inputs(arch, 4, 6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)["logits"], _model_logits(arch, inputs), **TOL)


@pytest.mark.parametrize("arch", ["bert-sdpa", "roberta-eager", "gpt2-sdpa", "gpt2-eager"])
def test_captured_without_padding_still_masks_padding(arch):
    """transformers drops an all-ones attention mask in eager runs; the graph must not."""
    inputs = example_inputs(arch, 2, 8)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    gm = capture(model(arch), inputs)
    padded = example_inputs(arch, 3, 6, seed=9)
    assert not padded["attention_mask"].all()
    with torch.no_grad():
        torch.testing.assert_close(gm(**padded)["logits"], _model_logits(arch, padded), **TOL)


def test_sequence_of_one_example_gives_a_dynamic_sequence_or_an_error():
    """Export specializes a size of 1; capture must not return a graph fixed to length 1
    without saying so (it may widen the example, as it does for a batch of one, or refuse)."""
    arch = "bert-sdpa"
    try:
        gm = capture(model(arch), example_inputs(arch, 2, 1))
    except (InvalidInputsError, CaptureError):
        return
    inputs = example_inputs(arch, 2, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)["logits"], _model_logits(arch, inputs), **TOL)


@pytest.mark.parametrize("arch", ["bert-eager", "gpt2-sdpa", "vit-sdpa"])
def test_output_is_a_dict_keyed_by_output_names(arch):
    out = captured(arch)(**example_inputs(arch))
    assert isinstance(out, dict)
    assert list(out) == ["logits"]
    assert all(isinstance(v, torch.Tensor) for v in out.values())


@pytest.mark.parametrize("arch", ["bert-sdpa", "gpt2-eager", "vit-eager"])
def test_pickle_round_trip(arch):
    gm = captured(arch)
    loaded = pickle.loads(pickle.dumps(gm))
    inputs = example_inputs(arch, 3, 5, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)["logits"], gm(**inputs)["logits"])


@pytest.mark.parametrize("arch", ["bert-sdpa", "gpt2-eager"])
def test_graph_is_plain_aten(arch):
    gm = captured(arch)
    assert not hasattr(gm, "_guards_fn")
    assert [n for n in gm.graph.nodes if n.op == "call_module"] == []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert (
                isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem
            ), node.format_node()
    assert type(gm).__module__.startswith("torch.fx")
    assert "transformers" not in gm.code


def test_capture_does_not_change_the_model():
    arch = "gpt2-sdpa"
    m = build(arch)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    use_cache = m.config.use_cache
    capture(m, example_inputs(arch), train=True)
    assert m.config.use_cache == use_cache
    assert not m.training
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def pair():
    arch = "bert-sdpa"
    m = build(arch)
    eval_gm, train_gm = capture_pair(m, example_inputs(arch))
    return arch, m, eval_gm, train_gm


def test_capture_pair_shares_parameters(pair):
    _, m, eval_gm, train_gm = pair
    eval_params = dict(eval_gm.named_parameters())
    train_params = dict(train_gm.named_parameters())
    assert eval_params.keys() == train_params.keys()
    assert len(eval_params) == len(list(m.parameters()))
    for name, p in eval_params.items():
        assert p is train_params[name]
    model_ptrs = {p.data_ptr() for p in m.parameters()}
    assert not model_ptrs & {p.data_ptr() for p in eval_params.values()}


def test_capture_pair_dropout_live_in_train_graph_only(pair):
    arch, _, eval_gm, train_gm = pair
    inputs = example_inputs(arch)
    with torch.no_grad():
        torch.manual_seed(0)
        a = train_gm(**inputs)["logits"]
        b = train_gm(**inputs)["logits"]
        assert not torch.equal(a, b)
        assert torch.equal(eval_gm(**inputs)["logits"], eval_gm(**inputs)["logits"])


def test_training_the_train_graph_updates_eval_graph_not_the_model():
    arch = "distilbert-eager"
    m = build(arch)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    inputs = example_inputs(arch)
    eval_gm, train_gm = capture_pair(m, inputs)
    with torch.no_grad():
        eval_before = eval_gm(**inputs)["logits"]
    opt = torch.optim.SGD(train_gm.parameters(), lr=0.1)
    loss = train_gm(**inputs)["logits"].square().sum()
    loss.backward()
    assert all(p.grad is not None for p in train_gm.parameters() if p.requires_grad)
    opt.step()
    with torch.no_grad():
        eval_after = eval_gm(**inputs)["logits"]
        model_out = m(**inputs).logits
    assert not torch.equal(eval_before, eval_after)
    torch.testing.assert_close(model_out, eval_before, **TOL)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _DataDependentBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return {"out": self.linear(x)}
        return {"out": -self.linear(x)}


class _ItemBranch(_DataDependentBranch):
    def forward(self, x):
        value = x.mean().item()
        return {"out": self.linear(x) * (2.0 if value > 0 else 3.0)}


@pytest.mark.parametrize("module", [_DataDependentBranch, _ItemBranch])
def test_untraceable_model_raises_capture_error_with_cause(module):
    with pytest.raises(CaptureError) as info:
        capture(module(), {"x": torch.randn(2, 3, 4)})
    assert info.value.__cause__ is not None
    assert module.__name__ in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        (torch.ones(2, 8, dtype=torch.long),),
        torch.ones(2, 8, dtype=torch.long),
        [("input_ids", torch.ones(2, 8, dtype=torch.long))],
        {},
        {"input_ids": [[1, 2, 3]]},
        None,
    ],
)
def test_non_dict_inputs_raise_invalid_inputs(bad):
    with pytest.raises(InvalidInputsError):
        capture(model("bert-sdpa"), bad)
    with pytest.raises(InvalidInputsError):
        capture_pair(model("bert-sdpa"), bad)


def test_non_module_raises_invalid_inputs():
    with pytest.raises(InvalidInputsError):
        capture(lambda **kw: kw, example_inputs("bert-sdpa"))
