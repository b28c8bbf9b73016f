"""grainfx.inspect: the kept structure as data, text, HTML and a plot."""

from __future__ import annotations

import pytest
import torch

import grainfx
import passes
from grainfx import buckets
from tests.captures import captured, structure


def compact():
    struct = structure("bert-sdpa")
    graph = passes.instrument(captured("bert-sdpa"), struct)
    masks = struct.ones()
    masks["attn0.vo"][1] = 0  # head 1 of layer 0 dropped
    masks["attn1.qk"][:, 4:] = 0  # half the query units of layer 1
    masks["ffn0"][:16] = 0
    passes.set_masks(graph, masks)
    return passes.rewrite(graph, struct)


def test_inspection_reports_heads_units_ffn_and_flops(tmp_path):
    info = grainfx.inspect(compact(), seq=32)
    first, second = info.layers
    assert (first.heads, first.heads_dense, first.head_index) == (3, 4, (0, 2, 3))
    assert first.ffn == 48 and first.ffn_dense == 64
    assert second.query_units == (4, 4, 4, 4) and second.value_units == (8, 8, 8, 8)
    assert info.flops < info.flops_dense
    assert "3/4" in str(info) and "<table>" in info._repr_html_()
    assert 0.5 < info.prunable_share < 1 and info.uncovered == ()
    assert f"coverage: {info.prunable_share:.0%} of the dense parameters" in str(info)
    assert info.rows()[0]["ffn"] == "48/64"
    assert info.plot(tmp_path / "kept.png").stat().st_size > 1000


def test_heads_without_query_units_are_shown_as_means():
    struct = structure("bert-sdpa")
    graph = passes.instrument(captured("bert-sdpa"), struct)
    masks = struct.ones()
    masks["attn1.qk"][1:3] = 0  # heads 1 and 2 of layer 1: values only
    passes.set_masks(graph, masks)
    info = grainfx.inspect(passes.rewrite(graph, struct), seq=32)
    assert [x.query_less for x in info.layers] == [0, 2]
    assert [r["query-less (mean)"] for r in info.rows()] == ["-", 2]
    assert info.layers[1].flops < info.layers[0].flops


def test_the_bucket_of_each_layer_is_shown_and_survives_a_save(tmp_path):
    struct = structure("bert-sdpa")
    graph = passes.instrument(captured("bert-sdpa"), struct)
    passes.set_masks(graph, struct.ones())
    info = grainfx.inspect(passes.rewrite(graph, struct, bucket=2), seq=32)
    assert [x.bucket for x in info.layers] == [2, 2]
    assert [r["bucket"] for r in info.rows()] == [2, 2] and "bucket" in str(info)
    path = grainfx.save(buckets.rewrite(graph, struct), tmp_path / "m.pt2")
    chosen = [x.bucket for x in grainfx.inspect(path).layers]
    assert all(b in (1, 2, 4, 8, struct.attention[0].head_dim) for b in chosen)


def test_inspect_reads_a_saved_file(tmp_path):
    path = grainfx.save(compact(), tmp_path / "m.pt2")
    assert grainfx.inspect(path).layers[0].heads == 3


def test_inspect_refuses_a_module_without_kept_structure():
    with pytest.raises(passes.LoadError, match="kept structure"):
        grainfx.inspect(torch.nn.Linear(2, 2))
