"""grainfx.stages: the graph after each pass, printable, comparable and consistent."""

from __future__ import annotations

import pytest
import torch

import grainfx
from tests.models import build, example_inputs

ARCH = "bert-sdpa"


@pytest.fixture(scope="module")
def pruned():
    model = build(ARCH)
    model.grainfx_before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = example_inputs(ARCH, 2, 8)
    shapes = grainfx.stages(model, inputs).structure.mask_shapes()
    gen = torch.Generator().manual_seed(0)
    masks = {k: (torch.rand(s, generator=gen) > 0.5).float() for k, s in shapes.items()}
    return model, inputs, masks, grainfx.stages(model, inputs, masks)


def test_stages_in_pass_order_with_a_summary(pruned):
    _, _, masks, stages = pruned
    assert list(stages.graphs) == ["captured", "instrumented", "compact"]
    rows = {r["stage"]: r for r in stages.summary()}
    assert "mul" not in rows["captured"]["ops"]
    assert rows["instrumented"]["ops"]["mul"] == len(masks)  # one multiply per mask
    assert rows["compact"]["parameters"] < rows["instrumented"]["parameters"]
    assert rows["captured"]["parameters"] == rows["instrumented"]["parameters"]
    text = str(stages)
    assert text.splitlines()[0].split() == ["stage", "nodes", "parameters", "key", "operators"]
    assert "instrumented" in text and "sdpa" in text


def test_code_and_diff_show_what_a_pass_changed(pruned):
    _, _, _, stages = pruned
    assert "grain_masks" not in stages.code("captured")
    assert "grain_masks" in stages.code("instrumented")
    diff = stages.diff("captured", "instrumented")
    assert diff.startswith("--- captured\n+++ instrumented\n")
    added = [line for line in diff.splitlines() if line.startswith("+ ")]
    assert added and any("grain_masks" in line for line in added)
    with pytest.raises(KeyError, match="no stage 'rewritten': the stages are"):
        stages.code("rewritten")


def test_compact_stage_computes_what_the_masked_one_does(pruned):
    model, inputs, _, stages = pruned
    x = example_inputs(ARCH, 3, 11, seed=5)
    with torch.no_grad():
        masked = stages.graphs["instrumented"](**x)["logits"]
        compact = stages.graphs["compact"](**x)["logits"]
    assert torch.allclose(masked, compact, atol=1e-5, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in model.grainfx_before.items())
