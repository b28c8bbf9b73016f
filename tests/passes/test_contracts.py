"""Pass contracts as code: checked mode names the pass that broke an invariant; passes stay
independent of grainfx."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import passes
from passes.contracts import CONTRACTS, checked, is_checked
from passes.errors import ContractError
from passes.structure import Structure
from tests.captures import captured, structure

ROOT = Path(__file__).resolve().parents[2]


def masked(arch: str = "bert-sdpa") -> tuple[Structure, torch.fx.GraphModule]:
    struct = structure(arch)
    graph = passes.instrument(captured(arch), struct)
    gen = torch.Generator().manual_seed(0)
    shapes = struct.mask_shapes()
    passes.set_masks(
        graph, {k: (torch.rand(v, generator=gen) < 0.5).float() for k, v in shapes.items()}
    )
    return struct, graph


def test_every_pass_declares_its_contract():
    assert set(CONTRACTS) == {"capture", "capture_pair", "discover", "instrument", "rewrite"}
    assert {name for name, c in CONTRACTS.items() if c.preserves_computation} == {
        "capture",
        "capture_pair",
        "instrument",
        "rewrite",
    }


def test_the_test_suite_runs_in_checked_mode():
    """tests/conftest.py sets GRAINFX_CHECKED=1: the exactness table checks every pass."""
    assert is_checked()
    with checked(False):
        assert not is_checked()


def test_a_rewrite_that_breaks_its_parameter_count_is_named(monkeypatch):
    struct, graph = masked()
    real = Structure.count_params
    monkeypatch.setattr(Structure, "count_params", lambda self, masks: real(self, masks) + 1)
    with pytest.raises(ContractError, match=r"passes.rewrite broke its contract \(ensures\): the "):
        passes.rewrite(graph, struct)
    with checked(False):
        passes.rewrite(graph, struct)  # the same bug goes unseen outside checked mode


def test_a_rewrite_that_changes_the_computation_is_named(monkeypatch):
    struct, graph = masked()
    module = sys.modules["passes.rewrite"]
    real = module.remove_dead_code

    def and_double_a_weight(gm):
        real(gm)
        next(gm.parameters()).data.mul_(2)

    monkeypatch.setattr(module, "remove_dead_code", and_double_a_weight)
    with pytest.raises(ContractError, match=r"rewrite broke its contract \(preserves comput"):
        passes.rewrite(graph, struct)


def test_an_instrument_that_changes_the_computation_is_named(monkeypatch):
    module = sys.modules["passes.instrument"]
    real = module._insert_mask

    def and_scale(graph, *args, **kwargs):
        node = real(graph, *args, **kwargs)
        with graph.inserting_after(node):
            scaled = graph.call_function(torch.ops.aten.mul.Tensor, (node, 2.0))
        node.replace_all_uses_with(scaled)
        scaled.args = (node, 2.0)
        return scaled

    monkeypatch.setattr(module, "_insert_mask", and_scale)
    with pytest.raises(ContractError, match=r"instrument broke its contract \(preserves comp"):
        passes.instrument(captured("bert-sdpa"), structure("bert-sdpa"))


def test_passes_import_nothing_from_grainfx():
    for path in (ROOT / "passes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "grainfx" for n in names), path
    result = subprocess.run(
        [sys.executable, "-c", "import sys, passes; print(sorted(m for m in sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'grainfx" not in result.stdout
