"""Text classification data for compress: batches from (text, label) rows, splits, accuracy."""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    TypeVar,
    cast,
)

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Rows = Sequence[tuple[str, int]]
Item = TypeVar("Item")


def as_dataset(items: list[Item]) -> torch.utils.data.Dataset[Item]:
    """``items`` for a DataLoader, which indexes a list as well as a map-style Dataset (torch's
    annotation asks for a Dataset; nothing is wrapped or copied)."""
    return cast("torch.utils.data.Dataset[Item]", items)


def stratified_split(rows: Rows, held_out: float, seed: int) -> tuple[list, list]:
    """(train, held-out) rows: ``held_out`` of each label, chosen with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted({y for _, y in rows}):
        group = [r for r in rows if r[1] == label]
        order = torch.randperm(len(group), generator=gen).tolist()
        cut = int(len(group) * held_out)
        test += [group[i] for i in order[:cut]]
        train += [group[i] for i in order[cut:]]
    shuffle = torch.randperm(len(train), generator=gen).tolist()
    return [train[i] for i in shuffle], test


def text_batches(
    rows: Rows,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    max_length: int = 128,
    group_by_length: bool = False,
    shard: tuple[int, int, int] = (0, 1, 1),
) -> torch.utils.data.DataLoader:
    """Dynamic-padding batches of tokenized text, with ``labels``.

    ``group_by_length`` (with ``shuffle``): each epoch, shuffle, then sort windows of 50
    batches by length and shuffle the batches, so a batch holds sentences of similar length
    and pads little (about half the tokens of random batches on Rotten Tomatoes). Lengths are
    those of the texts cut to ``max_length`` tokens, and a huge text is cut to what those
    tokens need before it is tokenized (:func:`grainfx.texts.clip`), so a 10 MB line costs
    what a normal one does.

    ``shard``: (rank, ranks, micro): this rank's micro-batches of every batch of
    ``batch_size`` (see :class:`grainfx.distributed.ShardedBatches`); needs
    ``group_by_length`` and ``shuffle``.
    """

    from grainfx.texts import clipper

    clip = clipper(tokenizer, max_length)

    def collate(batch: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            [clip(t) for t, _ in batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {**enc, "labels": torch.tensor([y for _, y in batch])}

    rows = list(rows)
    generator = torch.Generator().manual_seed(seed)
    if group_by_length and shuffle:
        lengths = [
            len(ids)
            for ids in tokenizer(
                [clip(t) for t, _ in rows], truncation=True, max_length=max_length
            )["input_ids"]
        ]
        sampler = shard_batches(LengthGroupedBatches(lengths, batch_size, generator), shard)
        return torch.utils.data.DataLoader(
            as_dataset(rows), batch_sampler=sampler, collate_fn=collate
        )
    if shard != (0, 1, 1):
        raise ValueError("text_batches shards only with group_by_length and shuffle")
    return torch.utils.data.DataLoader(
        as_dataset(rows),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=generator,
    )


class LengthGroupedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of indices of similar length, in a new seeded order every epoch."""

    WINDOW = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator):
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def sizes(self) -> list[int]:
        """The size of every batch of an epoch (the same every epoch, in another order)."""
        count, window = len(self.lengths), self.batch_size * self.WINDOW
        sizes = []
        for start in range(0, count, window):
            chunk = min(window, count - start)
            sizes += [min(self.batch_size, chunk - i) for i in range(0, chunk, self.batch_size)]
        return sizes

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        window = self.batch_size * self.WINDOW
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def shard_batches(
    batches: torch.utils.data.Sampler[list[int]], shard: tuple[int, int, int]
) -> torch.utils.data.Sampler[list[int]]:
    """``batches`` itself for ``shard`` (0, 1, 1), else the (rank, ranks, micro) share of it."""
    from grainfx.distributed import ShardedBatches

    return batches if shard == (0, 1, 1) else ShardedBatches(batches, *shard)


def predictions(
    model: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, predicted labels) of every example in ``batches``, in order; ``model`` returns
    a dict or an object with logits."""
    gold, guessed = [], []
    with torch.inference_mode():
        for batch in batches:
            batch = dict(batch)
            gold.append(batch.pop("labels"))
            out = model(**batch)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            guessed.append(logits.argmax(-1))
    if not gold:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(gold), torch.cat(guessed)


def accuracy(model: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Share of correct predictions; ``model`` returns a dict or an object with logits."""
    gold, guessed = predictions(model, batches)
    return float((gold == guessed).float().mean()) if len(gold) else 0.0


def finetune(
    model: torch.nn.Module,
    batches: torch.utils.data.DataLoader,
    epochs: float,
    learning_rate: float,
    seed: int,
    progress: bool = True,
) -> torch.nn.Module:
    """Plain fine-tuning with the model's own loss (labels in the batches); returns it in eval
    mode. AdamW, 10% warm-up then linear decay, gradient clip 1."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    steps = max(1, int(epochs * len(batches)))
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps)
    )
    model.train()
    done = 0
    with tqdm(total=steps, desc="fine-tune teacher", unit="step", disable=not progress) as bar:
        while done < steps:
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
                done += 1
                if done == steps:
                    break
    return model.eval()
