"""Causal language modelling data for compress: text files, padded batches, perplexity.

A decoder (GPT-2, Llama, ...) is compressed like any other model: its per-token logits
(batch, seq, vocab) are distilled with padding masked, and the hidden-state loss pairs the
residual stream of teacher and student layer by layer. This module gives it data and a
held-out measure: documents read from a plain-text or JSON Lines file, right-padded batches
whose ``labels`` are the input ids with ``-100`` on padding (the convention of transformers'
causal-LM loss, shifted inside), and the perplexity of next-token prediction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from grainfx.data import LengthGroupedBatches, as_dataset, shard_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Label id of positions that are not predicted (padding).
IGNORE = -100


class DataError(ValueError):
    """A text file or tokenizer that causal-LM batches cannot be made from."""


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """The documents of ``path``, in file order.

    A ``.jsonl`` / ``.json`` file holds one JSON object a line, its text under
    ``text_column``; any other file is plain text, one document a line. Blank lines are
    skipped and surrounding whitespace is stripped.

    Raises:
        DataError: the file is missing, holds no text, is a CSV, or a JSON line is not an
            object with a string under ``text_column``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raise DataError(
            f"{path}: for a language model give plain text (one document a line) "
            f"or JSON Lines (.jsonl), not CSV"
        )
    lines = [
        (number, line.strip())
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    if suffix not in (".jsonl", ".json"):
        texts = [line for _, line in lines]
    else:
        texts = [_json_text(path, number, line, text_column) for number, line in lines]
        texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path} holds no text")
    return texts


def _json_text(path: Path, number: int, line: str, column: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} line {number} is not JSON ({exc.msg}): a .jsonl file holds "
            f"one JSON object a line"
        ) from exc
    if not isinstance(row, dict):
        raise DataError(
            f"{path} line {number} is a JSON {type(row).__name__}, not an object "
            f"with a {column!r} field"
        )
    if column not in row:
        raise DataError(
            f"{path} line {number} has no field {column!r} (its fields: "
            f"{sorted(row)}); name the field that holds the text with "
            f"--text-column (text_column)"
        )
    text = row[column]
    if not isinstance(text, str):
        raise DataError(
            f"{path} line {number}: field {column!r} is "
            f"{'null' if text is None else type(text).__name__}, not a string"
        )
    return text.strip()


def split_texts(texts: Sequence[str], held_out: float, seed: int) -> tuple[list, list]:
    """(train, held-out) documents: a seeded random ``held_out`` share is held out."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(texts) * held_out)
    return [texts[i] for i in order[cut:]], [texts[i] for i in order[:cut]]


def lm_batches(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    max_length: int = 128,
    shard: tuple[int, int, int] = (0, 1, 1),
) -> torch.utils.data.DataLoader:
    """Right-padded batches of tokenized documents, with ``labels``.

    Each batch is what ``tokenizer`` returns (input_ids, attention_mask, ...) plus ``labels``:
    the input ids with ``-100`` where attention_mask is 0. Documents longer than
    ``max_length`` tokens are cut. A tokenizer without a pad token gets its eos token as pad
    (set on the tokenizer, as usual for decoders; padding is masked, so the id does not
    matter). With ``shuffle``, batches hold documents of similar length
    (:class:`grainfx.data.LengthGroupedBatches`) in a new seeded order every epoch.
    ``shard``: (rank, ranks, micro), this rank's micro-batches of every batch (with
    ``shuffle``; see :class:`grainfx.distributed.ShardedBatches`).

    Raises:
        DataError: the tokenizer has neither a pad nor an eos token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(
                "the tokenizer has neither a pad token nor an eos token to pad "
                "with: set tokenizer.pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    from grainfx.texts import clipper

    clip = clipper(tokenizer, max_length)

    def collate(batch: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            [clip(t) for t in batch],
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE)
        return {**enc, "labels": labels}

    texts = list(texts)
    if shuffle:
        clipped = [clip(t) for t in texts]
        encoded = tokenizer(clipped, truncation=True, max_length=max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        sampler = shard_batches(
            LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(seed)), shard
        )
        return torch.utils.data.DataLoader(
            as_dataset(texts), batch_sampler=sampler, collate_fn=collate
        )
    if shard != (0, 1, 1):
        raise ValueError("lm_batches shards only with shuffle")
    return torch.utils.data.DataLoader(
        as_dataset(texts), batch_size=batch_size, shuffle=False, collate_fn=collate
    )


def perplexity(model: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Perplexity of next-token prediction: exp of the mean negative log-likelihood over
    every predicted token of ``batches``.

    ``model`` returns a dict with ``logits`` (a compact GraphModule, a loaded ``.pt2``) or an
    object with ``.logits`` (a transformers model), of shape (batch, seq, vocab). Position t
    predicts token t + 1 of ``labels`` (positions labelled ``-100`` are not counted); a batch
    without ``labels`` predicts its ``input_ids`` where ``attention_mask`` is 1.

    Raises:
        ValueError: the batches hold no token to predict (every document shorter than two
            tokens).
    """
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels", None)
            if labels is None:
                labels = batch["input_ids"]
                if "attention_mask" in batch:
                    labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE)
            out = model(**batch)
            logits = out["logits"] if isinstance(out, Mapping) else out.logits
            targets = labels[:, 1:]
            nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                targets.flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            ).double()
            count += int((targets != IGNORE).sum())
    if count == 0:
        raise ValueError(
            "perplexity: the batches hold no token to predict (each document "
            "needs at least two tokens)"
        )
    return math.exp(nll.item() / count)
