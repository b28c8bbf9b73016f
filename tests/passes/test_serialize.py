"""save / load: a .pt2 that loads in a fresh process without transformers; clear errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import grainfx
import passes
from tests.captures import captured, structure
from tests.fresh_process import run_without_transformers
from tests.models import example_inputs

ROOT = Path(__file__).resolve().parents[2]


def compact(arch: str, seed: int = 0):
    struct = structure(arch)
    graph = passes.instrument(captured(arch), struct)
    gen = torch.Generator().manual_seed(seed)
    passes.set_masks(
        graph,
        {
            name: (torch.rand(size, generator=gen) < 0.5).float()
            for name, size in struct.mask_shapes().items()
        },
    )
    return passes.rewrite(graph, struct)


@pytest.mark.parametrize(
    "arch", ["bert-sdpa", "gpt2-eager", "llama-sdpa", "bloom-eager", "deberta_v3-eager"]
)
def test_saved_model_loads_in_a_process_without_transformers(arch, tmp_path):
    module = compact(arch)
    path = grainfx.save(module, tmp_path / "model.pt2")
    inputs = example_inputs(arch, 3, 10, seed=4)
    with torch.no_grad():
        expected = module(**inputs)
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    result = run_without_transformers(f"""
        import torch, grainfx
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = grainfx.load({str(path)!r})
        with torch.no_grad():
            out = model(**io["inputs"])
        for name, value in io["expected"].items():
            assert torch.allclose(out[name], value, rtol=1e-5, atol=1e-6), name
        assert model.grainfx_kept.layers, "kept structure missing"
        print("OK")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_save_writes_the_kept_structure_beside_the_model_and_no_temporary_files(tmp_path):
    module = compact("distilbert-sdpa")
    grainfx.save(module, tmp_path / "m.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt2"]
    kept = json.loads((tmp_path / "m.json").read_text())
    inputs = kept.pop("inputs")
    expected = module.grainfx_kept.to_dict()
    assert expected.pop("inputs") == {} and kept == expected
    ids = module.grainfx_example_inputs["input_ids"]
    assert inputs == {
        "input_ids": {"shape": [2, 8], "dtype": "int64", "max": int(ids.max())},
        "attention_mask": {"shape": [2, 8], "dtype": "int64", "max": 1},
    }
    again = grainfx.load(tmp_path / "m.pt2").grainfx_kept
    assert again.to_dict() == {**kept, "inputs": inputs}
    assert again == passes.KeptStructure.from_json((tmp_path / "m.json").read_text())


def test_saved_files_have_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        passes.save(compact("distilbert-sdpa"), tmp_path / "m.pt2")
    finally:
        os.umask(old)
    for name in ("m.pt2", "m.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_full_disk_gives_a_save_error_and_leaves_the_previous_file(tmp_path):
    module = compact("distilbert-sdpa")
    path = passes.save(module, tmp_path / "m.pt2")
    before = path.read_bytes()
    torch.save(module, tmp_path / "module.pt")
    script = textwrap.dedent(f"""
        import resource, signal, torch, passes
        module = torch.load({str(tmp_path / "module.pt")!r}, weights_only=False)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            passes.save(module, {str(path)!r})
        except passes.SaveError as exc:
            print("SaveError:", exc)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SaveError: could not write {path}" in result.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt2", "module.pt"]


def test_save_refuses_a_path_that_is_not_pt2(tmp_path):
    with pytest.raises(passes.SaveError, match=r"\.pt2"):
        grainfx.save(compact("bert-sdpa"), tmp_path / "model.bin")


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(passes.ModelFileNotFoundError, match="no model file"):
        grainfx.load(tmp_path / "absent.pt2")


def test_load_of_a_truncated_file(tmp_path):
    path = grainfx.save(compact("bert-sdpa"), tmp_path / "model.pt2")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(passes.CorruptModelFileError, match="truncated"):
        grainfx.load(path)


def test_load_of_a_foreign_file(tmp_path):
    path = tmp_path / "notes.pt2"
    path.write_text("this is not a model")
    with pytest.raises(passes.CorruptModelFileError, match="grainfx.save"):
        grainfx.load(path)


@pytest.mark.parametrize("arch", ["bert-sdpa", "llama-sdpa"])
def test_compiled_compact_module_matches_eager(arch):
    module = compact(arch, seed=2)
    compiled = torch.compile(module)
    with torch.no_grad():
        for batch, seq in ((2, 8), (3, 12)):
            inputs = example_inputs(arch, batch, seq, seed=batch)
            expected, actual = module(**inputs), compiled(**inputs)
            assert torch.allclose(expected["logits"], actual["logits"], rtol=1e-4, atol=1e-5)


def compact_with_means(arch: str):
    """A compact model in which half the heads of every block have no query units."""
    struct = structure(arch)
    graph = passes.instrument(captured(arch), struct)
    masks = struct.ones()
    for block in struct.attention:
        masks[block.mask_names()["qk"]][: block.kv_heads // 2] = 0
    passes.set_masks(graph, masks)
    module = passes.rewrite(graph, struct)
    assert any("query_less_mean" in n.name for n in module.graph.nodes)
    return module


@pytest.mark.parametrize("arch", ["bert-sdpa", "gpt2-eager", "llama-sdpa"])
def test_heads_computed_as_means_save_and_load(arch, tmp_path):
    """Heads without query units (a masked or running mean of their values) re-export with
    dynamic batch and sequence."""
    module = compact_with_means(arch)
    loaded = grainfx.load(grainfx.save(module, tmp_path / "model.pt2"))
    with torch.no_grad():
        for batch, seq in ((3, 10), (1, 5)):
            inputs = example_inputs(arch, batch, seq, seed=2)
            expected, actual = module(**inputs), loaded(**inputs)
            for name, value in expected.items():
                torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-5)


def test_heads_computed_as_means_compile():
    """The running mean of a causal, padded model (cumsum, the empty-row fill) compiles."""
    module = compact_with_means("gpt2-eager")
    inputs = example_inputs("gpt2-eager", 3, 10, seed=2)
    with torch.no_grad():
        expected, actual = module(**inputs), torch.compile(module)(**inputs)
    torch.testing.assert_close(actual["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
