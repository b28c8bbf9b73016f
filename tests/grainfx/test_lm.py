"""grainfx.lm and compress on decoders: text files, causal-LM batches, perplexity, and GRAIN
end to end on a tiny GPT-2 and a tiny Llama (RoPE, GQA, gated FFN) language model."""

from __future__ import annotations

import functools
import json
import math
import re

import pytest
import torch
import transformers as T

import grainfx
import passes
from grainfx.lm import IGNORE, DataError, lm_batches, perplexity, read_texts, split_texts
from tests.models import build, example_inputs

ARCH = "gpt2-sdpa"
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "and", "then", "slept"]


def tokenizer(pad: bool = True) -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids 3..), with <pad>=0, <unk>=1, <eos>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=inner,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<pad>" if pad else None,
        model_input_names=["input_ids", "attention_mask"],
    )


def lm_batch(seed: int, batch: int = 4, seq: int = 10) -> dict[str, torch.Tensor]:
    """Right-padded GPT-2 inputs with ``labels`` (-100 on padding)."""
    x = example_inputs(ARCH, batch, seq, seed=seed)
    return {**x, "labels": x["input_ids"].masked_fill(x["attention_mask"] == 0, IGNORE)}


class Uniform(torch.nn.Module):
    """Logits of zeros over ``vocab`` tokens: every next token has probability 1 / vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return {"logits": torch.zeros(*input_ids.shape, self.vocab)}


# -- perplexity ---------------------------------------------------------------------------------


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    assert perplexity(Uniform(128), [lm_batch(0), lm_batch(1)]) == pytest.approx(128, rel=1e-6)


def test_perplexity_matches_the_models_own_loss_token_weighted():
    model = build(ARCH)
    batches = [lm_batch(0, batch=4, seq=10), lm_batch(1, batch=3, seq=7)]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            loss = model(**b).loss.item()  # mean over the predicted tokens of b
            count = int((b["labels"][:, 1:] != IGNORE).sum())
            nll, tokens = nll + loss * count, tokens + count
    assert perplexity(model, batches[:1]) == pytest.approx(
        math.exp(model(**batches[0]).loss.item()), rel=1e-5
    )
    assert perplexity(model, batches) == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_perplexity_ignores_padding_and_needs_no_labels():
    model = build(ARCH)
    b = lm_batch(2)
    reference = perplexity(model, [b])
    unlabelled = {k: v for k, v in b.items() if k != "labels"}
    assert perplexity(model, [unlabelled]) == pytest.approx(reference, rel=1e-6)
    # three more padded positions holding arbitrary tokens change nothing
    extra = torch.randint(3, 99, (b["input_ids"].shape[0], 3))
    padded = {
        "input_ids": torch.cat([b["input_ids"], extra], 1),
        "attention_mask": torch.cat([b["attention_mask"], torch.zeros_like(extra)], 1),
    }
    assert perplexity(model, [padded]) == pytest.approx(reference, rel=1e-5)


def test_perplexity_without_a_token_to_predict():
    single = {"input_ids": torch.tensor([[5], [6]]), "attention_mask": torch.ones(2, 1)}
    with pytest.raises(ValueError, match="no token to predict"):
        perplexity(Uniform(10), [single])


# -- text files ---------------------------------------------------------------------------------


def test_read_plain_text_one_document_a_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("the cat sat\n\n  a dog ran  \n\n\nthen slept")
    assert read_texts(path) == ["the cat sat", "a dog ran", "then slept"]


def test_read_jsonl_text_field(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"body": "the cat sat", "id": 1}, {"body": "a dog ran", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_texts(path, "body") == ["the cat sat", "a dog ran"]


@pytest.mark.parametrize(
    "name,content,column,message",
    [
        ("absent.txt", None, "text", "absent.txt does not exist"),
        ("empty.txt", "", "text", "empty.txt holds no text"),
        ("blank.txt", "\n  \n\n", "text", "blank.txt holds no text"),
        ("rows.csv", "text\nthe cat\n", "text", "not CSV"),
        (
            "nofield.jsonl",
            '{"body": "the cat"}\n',
            "text",
            "line 1 has no field 'text' (its fields: ['body'])",
        ),
        ("broken.jsonl", '{"text": "the cat"}\n{"text": \n', "text", "line 2 is not JSON"),
        (
            "null.jsonl",
            '{"text": "the cat"}\n{"text": null}\n',
            "text",
            "line 2: field 'text' is null",
        ),
        ("list.jsonl", '["the cat"]\n', "text", "line 1 is a JSON list"),
    ],
)
def test_bad_text_files(tmp_path, name, content, column, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        read_texts(path, column)


def test_split_texts_is_a_seeded_partition():
    texts = [f"doc {i}" for i in range(20)]
    train, held_out = split_texts(texts, 0.25, seed=3)
    assert len(held_out) == 5 and len(train) == 15
    assert sorted(train + held_out) == sorted(texts)
    assert split_texts(texts, 0.25, seed=3) == (train, held_out)
    assert split_texts(texts, 0.25, seed=4) != (train, held_out)


# -- batches ------------------------------------------------------------------------------------


def test_lm_batches_pad_right_and_label_padding_ignored():
    texts = ["the cat sat on a mat", "a dog ran", "then slept", "the dog sat on the log"]
    tok = tokenizer()
    batch = next(iter(lm_batches(texts, tok, 4, shuffle=False)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    mask = batch["attention_mask"]
    assert mask.tolist()[1] == [1, 1, 1, 0, 0, 0]  # right padding
    assert torch.equal(batch["labels"][mask == 1], batch["input_ids"][mask == 1])
    assert bool((batch["labels"][mask == 0] == IGNORE).all())
    assert bool((batch["input_ids"][mask == 0] == tok.pad_token_id).all())


def test_lm_batches_pad_with_eos_when_the_tokenizer_has_no_pad_token():
    tok = tokenizer(pad=False)
    batch = next(iter(lm_batches(["the cat sat", "a dog"], tok, 2, shuffle=False)))
    assert tok.pad_token == "<eos>"
    assert batch["input_ids"][1, 2].item() == tok.eos_token_id
    assert batch["labels"][1, 2].item() == IGNORE


def test_lm_batches_shuffled_cover_every_document_once_per_epoch():
    texts = [" ".join(WORDS[: 1 + i % len(WORDS)]) for i in range(30)]
    tok = tokenizer()
    loader = lm_batches(texts, tok, 4, shuffle=True, seed=1)
    first, second = (
        [
            tok.decode(row[m.bool()])
            for b in loader
            for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        ]
        for _ in range(2)
    )
    assert sorted(first) == sorted(second) == sorted(texts)
    assert first != second  # a new order every epoch
    again = lm_batches(texts, tok, 4, shuffle=True, seed=1)
    assert [
        tok.decode(row[m.bool()])
        for b in again
        for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    ] == first


# -- compress on decoders -----------------------------------------------------------------------


@functools.cache
def gpt2_run(pad_seed: int = 0):
    """GRAIN on the tiny GPT-2 LM at 50%; padded positions hold tokens drawn from
    ``pad_seed``."""
    gen = torch.Generator().manual_seed(pad_seed)
    batches = []
    for i in range(4):
        b = lm_batch(10 + i)
        noise = torch.randint(3, 99, b["input_ids"].shape, generator=gen)
        b["input_ids"] = torch.where(b["attention_mask"] == 1, b["input_ids"], noise)
        batches.append(b)
    result = grainfx.compress(
        build(ARCH), batches, 0.5, config=grainfx.GrainConfig(steps=10), progress=False
    )
    return result, batches


def test_compress_gpt2_lm_per_token_logits_and_perplexity(tmp_path):
    result, batches = gpt2_run()
    assert abs(result.density - 0.5) <= 0.005
    assert result.report["steps"] == 10
    assert all(math.isfinite(x) and x > 0 for x in result.report["kd_loss"])
    assert all(math.isfinite(x) and x > 0 for x in result.report["hidden_loss"])
    held_out = [lm_batch(100), lm_batch(101, batch=3, seq=13)]
    x = {k: v for k, v in held_out[1].items() if k != "labels"}
    with torch.no_grad():
        logits = result.module(**x)["logits"]
        expected = result.masked(**x)["logits"]
    assert logits.shape == (3, 13, 100)  # (batch, seq, vocab)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
    student = perplexity(result.module, held_out)
    teacher = perplexity(build(ARCH), held_out)
    assert math.isfinite(student) and student > 1
    assert math.isfinite(teacher) and teacher > 1
    loaded = passes.load(result.save(tmp_path / "gpt2.pt2"))
    assert perplexity(loaded, held_out) == pytest.approx(student, rel=1e-5)


def test_compress_gpt2_lm_distils_only_unpadded_tokens():
    """Two runs whose batches differ only in the tokens at padded positions: with the logit
    and hidden-state losses masked per token (and causal attention), they are the same run."""
    first, first_batches = gpt2_run(pad_seed=0)
    second, second_batches = gpt2_run(pad_seed=1)
    assert not torch.equal(first_batches[0]["input_ids"], second_batches[0]["input_ids"])
    for name, mask in first.masks.items():
        assert torch.equal(mask, second.masks[name]), name
    assert first.report["kd_loss"] == pytest.approx(second.report["kd_loss"], rel=1e-5)
    assert first.report["hidden_loss"] == pytest.approx(second.report["hidden_loss"], rel=1e-5)


def test_compress_llama_causal_lm_with_rope_gqa_and_gated_ffn(tmp_path):
    """A tiny Llama (RoPE, 4 query heads sharing 2 key/value heads, gated FFN) compressed end
    to end like GPT-2: density reached, compact = masked student, perplexity finite, and the
    saved file gives the same logits."""
    config = T.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        attention_dropout=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    config.initializer_range = 0.3  # attention scores O(1), as the other test models
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    batches = [lm_batch(20 + i) for i in range(4)]
    result = grainfx.compress(
        model, batches, 0.5, config=grainfx.GrainConfig(steps=10), progress=False
    )
    assert abs(result.density - 0.5) <= 0.01
    assert len(result.report["layers"]) == 2
    held_out = [lm_batch(200), lm_batch(201, batch=3, seq=13)]
    x = {k: v for k, v in held_out[1].items() if k != "labels"}
    with torch.no_grad():
        logits = result.module(**x)["logits"]
        expected = result.masked(**x)["logits"]
    assert logits.shape == (3, 13, 100)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
    student = perplexity(result.module, held_out)
    assert math.isfinite(student) and student > 1
    assert math.isfinite(perplexity(model, held_out))
    loaded = passes.load(result.save(tmp_path / "llama.pt2"))
    assert perplexity(loaded, held_out) == pytest.approx(student, rel=1e-5)
