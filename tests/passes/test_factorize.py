"""Word-embedding factorization: exact at full rank, smaller at low rank, tied weights refused."""

from __future__ import annotations

import pytest
import torch

import passes
from tests.captures import captured
from tests.models import HIDDEN, VOCAB, example_inputs


def test_full_rank_factorization_keeps_the_outputs_and_lower_rank_changes_them():
    gm = captured("bert-eager")
    inputs = example_inputs("bert-eager", 3, 9)
    full = passes.factorize_embedding(gm, HIDDEN)
    low = passes.factorize_embedding(gm, HIDDEN - 4)
    assert low.grain_embedding.table.shape == (VOCAB, HIDDEN - 4)
    assert low.grain_embedding.projection.shape == (HIDDEN, HIDDEN - 4)
    with torch.no_grad():
        dense = gm(**inputs)["logits"]
        assert torch.allclose(full(**inputs)["logits"], dense, atol=1e-4)
        assert not torch.allclose(low(**inputs)["logits"], dense, atol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        passes.factorize_embedding(gm, HIDDEN + 1)


def test_low_rank_saves_parameters_and_keeps_the_structure():
    gm = captured("distilbert-sdpa")
    small = passes.factorize_embedding(gm, 8)
    before = sum(p.numel() for p in gm.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert before - after == VOCAB * HIDDEN - (VOCAB * 8 + 8 * HIDDEN)
    assert passes.discover(small).mask_shapes() == passes.discover(gm).mask_shapes()
    assert passes.discover(small).total_params == after


def test_svd_reconstruction_is_what_the_graph_computes():
    gm = captured("bert-sdpa")
    small = passes.factorize_embedding(gm, 16)
    table, proj = small.grain_embedding.table, small.grain_embedding.projection
    weight = gm.bert.embeddings.word_embeddings.weight
    u, s, vh = torch.linalg.svd(weight.detach(), full_matrices=False)
    best = (u[:, :16] * s[:16]) @ vh[:16]
    assert torch.allclose(table @ proj.t(), best, atol=1e-5)


def test_shared_factors_between_train_and_eval_graphs():
    eval_gm, train_gm = passes.capture_pair(
        __import__("tests.captures", fromlist=["model"]).model("bert-sdpa"),
        example_inputs("bert-sdpa"),
    )
    train = passes.factorize_embedding(train_gm, 8)
    evaluation = passes.factorize_embedding(eval_gm, 8, share_with=train)
    assert evaluation.grain_embedding.table is train.grain_embedding.table


def test_tied_embedding_is_refused():
    with pytest.raises(passes.DiscoverError, match="tied"):
        passes.factorize_embedding(captured("gpt2-sdpa"), 8)
