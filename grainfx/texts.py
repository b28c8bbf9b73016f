"""Texts cut to what tokenization to a maximum length reads, so a huge text costs what a normal
one does.

Tokenizers cut a text to ``max_length`` tokens only after tokenizing all of it: a 10 MB line
takes minutes and gigabytes. :func:`clip` gives the start of a text (the end, for left
truncation) that yields the same first ``max_length`` tokens: it is cut at the start of a
whitespace run, where every tokenizer grainfx serves (WordPiece, byte-level BPE, SentencePiece's
metaspace) starts a new token, once that part alone holds ``max_length`` tokens. A text
shorter than ``CHARS_PER_TOKEN * max_length`` characters is never cut; none is tokenized
beyond ``MAX_CHARS_PER_TOKEN * max_length`` characters (a longer run without ``max_length``
tokens, e.g. megabytes of spaces, is cut there). Needs the standard library only.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Texts up to ``CHARS_PER_TOKEN * max_length`` characters are tokenized whole.
CHARS_PER_TOKEN = 16
#: No more than ``MAX_CHARS_PER_TOKEN * max_length`` characters of a text are tokenized.
MAX_CHARS_PER_TOKEN = 1024
#: A whitespace character after a non-whitespace one: the start of a whitespace run.
RUN_START = re.compile(r"(?<=\S)\s")


def clip(text: str, max_length: int, count: Callable[[str], int], side: str = "right") -> str:
    """``text``, or the part of it that holds its first (``side="left"``: last)
    ``max_length`` tokens.

    ``count(part)``: the number of tokens of ``part``, without special tokens (called only on
    texts longer than ``CHARS_PER_TOKEN * max_length`` characters, on parts at most
    ``MAX_CHARS_PER_TOKEN * max_length`` characters long).
    """
    limit, ceiling = CHARS_PER_TOKEN * max_length, MAX_CHARS_PER_TOKEN * max_length
    while len(text) > limit:
        part = _part(text, limit, side)
        if limit >= ceiling or count(part) >= max_length:
            return part
        limit *= 4
    return text


def _part(text: str, limit: int, side: str) -> str:
    """At most about ``limit`` characters of ``text`` from its start (``side="left"``: its
    end), cut at the start of a whitespace run where there is one."""
    if side == "left":
        found = RUN_START.search(text, len(text) - limit)
        return text[found.start() :] if found else text[-limit:]
    cut = None
    for found in RUN_START.finditer(text, 1, limit + 1):
        cut = found.start()
    return text[:cut] if cut else text[:limit]


def clipper(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[str], str]:
    """:func:`clip` for a transformers tokenizer (on its ``truncation_side``)."""
    side = getattr(tokenizer, "truncation_side", "right")

    def count(part: str) -> int:
        return len(tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"])

    return lambda text: clip(text, max_length, count, side)
