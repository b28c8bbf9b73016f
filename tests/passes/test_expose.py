"""expose: layer outputs added to the output dict, model outputs unchanged."""

from __future__ import annotations

import pytest
import torch

import passes
from tests.captures import captured, structure
from tests.models import HIDDEN, example_inputs


@pytest.mark.parametrize("arch", ["bert-eager", "gpt2-sdpa", "vit-sdpa"])
def test_layer_outputs_are_exposed(arch):
    gm, struct = captured(arch), structure(arch)
    keys = {f"hidden.{i}": name for i, name in enumerate(struct.layer_outputs)}
    exposed = passes.expose(gm, keys)
    inputs = example_inputs(arch, 2, 8)
    with torch.no_grad():
        out, ref = exposed(**inputs), gm(**inputs)
    assert torch.equal(out["logits"], ref["logits"])
    for key in keys:
        assert out[key].shape[-1] == HIDDEN and out[key].shape[0] == 2


def test_expose_refuses_unknown_nodes_and_clashing_keys():
    gm = captured("bert-sdpa")
    with pytest.raises(passes.DiscoverError, match="not in the graph"):
        passes.expose(gm, {"x": "no_such_node"})
    with pytest.raises(passes.DiscoverError, match="already exist"):
        passes.expose(gm, {"logits": structure("bert-sdpa").layer_outputs[0]})
