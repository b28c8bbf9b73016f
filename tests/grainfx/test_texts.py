"""grainfx.texts: a huge text is cut before tokenization to what its first (or last)
max_length tokens need, and tokenizes to the same tokens as the whole text."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from grainfx.texts import CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN, clip, clipper

WORDS = ["good", "great", "film", "the", "plot", "a" * 120, "x-y", "don't", "é", "日本", "3.5"]


def random_text(rng: random.Random, words: int) -> str:
    spaces = [" ", "  ", "\n", " \t ", "   \n\n"]
    return "".join(rng.choice(WORDS) + rng.choice(spaces) for _ in range(words)).strip()


def bert():
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    vocab.update({w: len(vocab) + i for i, w in enumerate(["good", "film", "the", "x", "##y"])})
    return BertTokenizerFast(vocab=vocab)


def byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rng = random.Random(1)
    tokenizer.train_from_iterator(
        [random_text(rng, 30) for _ in range(50)], trainers.BpeTrainer(vocab_size=300)
    )
    return tokenizer


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_clipped_text_gives_the_tokens_of_the_whole_text(side):
    rng = random.Random(0)
    hf, bpe = bert(), byte_level()
    hf.truncation_side = side
    for max_length in (2, 5, 9):
        cut = clipper(hf, max_length)
        for words in (1, 10, 60, 400):
            text = random_text(rng, words)
            whole = hf(text, truncation=True, max_length=max_length)["input_ids"]
            assert hf(cut(text), truncation=True, max_length=max_length)["input_ids"] == whole

            def ids(t: str, n: int = max_length) -> list[int]:
                all_ids = bpe.encode(t).ids
                return all_ids[:n] if side == "right" else all_ids[len(all_ids) - n :]

            clipped = clip(text, max_length, lambda p: len(bpe.encode(p).ids), side)
            assert ids(clipped) == ids(text), (max_length, words)


def test_short_texts_are_untouched_and_a_huge_one_is_bounded():
    calls = []

    def count(part: str) -> int:
        calls.append(len(part))
        return len(part.split())

    text = "word " * 50
    assert clip(text, 64, count) is text and not calls
    huge = "word " * 2_000_000
    part = clip(huge, 64, count)
    assert 64 <= len(part.split()) and len(part) <= CHARS_PER_TOKEN * 64 and len(calls) == 1
    calls.clear()
    spaces = "a" + " " * 10_000_000 + "b"  # never 8 tokens: cut at the ceiling
    assert clip(spaces, 8, count) == "a" and clip(spaces, 8, count, "left") == " " * 8191 + "b"
    assert max(calls) <= MAX_CHARS_PER_TOKEN * 8 and len(calls) == 6
