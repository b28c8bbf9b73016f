"""A compressed model's folder, served on its own: ``grainfx.load(OUT_DIR)`` and
``grainfx predict``.

``grainfx compress`` writes a folder that holds everything needed to run the compact model on
raw text: ``model.pt2`` (the graph), ``tokenizer.json`` (with the tokenizer's other files),
and ``grainfx.json`` (task, label names in class-id order, maximum length, padding).
Loading needs torch and the ``tokenizers`` library only, not transformers nor the original
model::

    model = grainfx.load("out")
    model("a gripping, funny film")          # Prediction(label='positive', score=0.93)
    model(["great", "dull"])                 # one Prediction per text
    model(input_ids=ids, attention_mask=m)   # the module's outputs: {"logits": ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import passes
from grainfx.texts import clip
from passes.errors import LoadError
from passes.serialize import INPUTS_ATTR

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: The serving record of an output folder, and its format.
SERVING_FILE = "grainfx.json"
FORMAT = "grainfx-output"
VERSION = 1
#: Tokenizer encoding fields of each model input the folder can serve.
ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}
TASKS = ("classification", "causal-lm")
#: The most tokens per text a serving record may name (no model grainfx serves takes more).
MAX_LENGTH = 1_000_000
#: The largest serving record read (a real one is a few kilobytes; label names make it grow).
MAX_RECORD_BYTES = 64 * 2**20
#: Parameters and buffers whose first (position_ids: last) size is the model's positions.
POSITION_WEIGHTS = ("position_embeddings.weight", "wpe.weight", "embed_positions.weight")


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FolderError(LoadError):
    """A folder that is not a complete grainfx output (the message names the missing part)."""


@dataclass(frozen=True)
class Serving:
    """What ``grainfx.json`` records: everything beyond the graph needed to serve raw text.

    ``labels``: class names in id order (classification; empty for causal-lm);
    ``max_length``: tokens per text, at most (longer texts are cut, as in training);
    ``pad_id`` / ``pad_token``: what pads a batch; ``padding_side`` / ``truncation_side``:
    ``"right"`` or ``"left"``.
    """

    task: str
    labels: tuple[str, ...]
    max_length: int
    pad_id: int
    pad_token: str
    padding_side: str = "right"
    truncation_side: str = "right"

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r:.60}")
        if isinstance(self.labels, str) or not isinstance(self.labels, (list, tuple)):
            raise ValueError(f"labels must be a list of names, got {self.labels!r:.60}")
        object.__setattr__(self, "labels", tuple(str(name) for name in self.labels))
        if self.task == "classification" and not self.labels:
            raise ValueError("a classifier needs its label names")
        repeated = sorted({name for name in self.labels if self.labels.count(name) > 1})
        if repeated:
            raise ValueError(f"labels must be distinct names, got {repeated[0]!r:.60} twice")
        if not _integer(self.max_length) or not 1 <= self.max_length <= MAX_LENGTH:
            raise ValueError(
                f"max_length must be an integer in 1..{MAX_LENGTH}, got {self.max_length!r:.60}"
            )
        if not _integer(self.pad_id) or self.pad_id < 0:
            raise ValueError(f"pad_id must be an integer >= 0, got {self.pad_id!r:.60}")
        if not isinstance(self.pad_token, str) or not self.pad_token:
            raise ValueError(f"pad_token must be a token (a string), got {self.pad_token!r:.60}")
        for side in (self.padding_side, self.truncation_side):
            if side not in ("right", "left"):
                raise ValueError(
                    f"padding and truncation sides are 'right' or 'left', got {side!r:.60}"
                )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "task": self.task,
                "labels": list(self.labels),
                "max_length": self.max_length,
                "pad_id": self.pad_id,
                "pad_token": self.pad_token,
                "padding_side": self.padding_side,
                "truncation_side": self.truncation_side,
            },
            indent=1,
        )

    @classmethod
    def read(cls, path: Path) -> Serving:
        try:
            if path.stat().st_size > MAX_RECORD_BYTES:
                raise ValueError(f"{path.stat().st_size:,} bytes, more than a record holds")
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            if record.pop("format") != FORMAT or record.pop("version") != VERSION:
                raise ValueError(f"not a version {VERSION} {FORMAT} record")
            return cls(**record)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FolderError(
                f"{path} is not a readable grainfx serving record ({reason:.200}): "
                f"write the folder again with grainfx compress"
            ) from None


@dataclass(frozen=True)
class Prediction:
    """The predicted class of one text: its name, its probability, and every class's."""

    label: str
    score: float
    scores: dict[str, float] = field(repr=False)


class Predictor:
    """A compact model with its tokenizer and label names, callable on raw text.

    ``predictor(text)`` gives a :class:`Prediction`, ``predictor([texts])`` a list of them
    (classification); for a causal LM both give the outputs of the tokenized batch
    (``{"logits": ...}``); ``predictor(**tensors)`` calls the module itself.
    """

    def __init__(self, module: torch.nn.Module, tokenizer: Tokenizer, serving: Serving):
        self.module, self.tokenizer, self.serving = module, tokenizer, serving
        self.input_names = list(getattr(module, INPUTS_ATTR, {})) or [
            "input_ids",
            "attention_mask",
        ]
        unknown = [n for n in self.input_names if n not in ENCODING_FIELDS]
        if unknown:
            raise FolderError(
                f"the model takes {unknown}, which a tokenizer does not give: "
                f"call the module on tensors (grainfx.load of model.pt2)"
            )
        tokenizer.enable_truncation(serving.max_length, direction=serving.truncation_side)
        tokenizer.enable_padding(
            direction=serving.padding_side, pad_id=serving.pad_id, pad_token=serving.pad_token
        )
        self._counter: Tokenizer | None = None  # a copy that neither cuts nor pads

    def _count(self, part: str) -> int:
        """The tokens of ``part``, without special tokens, none cut."""
        if self._counter is None:
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(self.tokenizer.to_str())
            self._counter.no_truncation()
            self._counter.no_padding()
        return len(self._counter.encode(part, add_special_tokens=False).ids)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.serving.labels

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's inputs for ``texts``: tokenized, cut to ``max_length``, padded (a huge
        text is cut to what those tokens need first: :func:`grainfx.texts.clip`)."""
        cut, side = self.serving.max_length, self.serving.truncation_side
        encodings = self.tokenizer.encode_batch([clip(t, cut, self._count, side) for t in texts])
        return {
            name: torch.tensor(
                [getattr(e, ENCODING_FIELDS[name]) for e in encodings], dtype=torch.long
            )
            for name in self.input_names
        }

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        """One :class:`Prediction` per text, in order (batches of ``batch_size``)."""
        if self.serving.task != "classification":
            raise ValueError(
                "predictions with label names are for classifiers; call a "
                "causal LM on texts for its logits"
            )
        texts, out = list(texts), []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                logits = self.module(**self.encode(texts[start : start + batch_size]))["logits"]
                if logits.shape[-1] != len(self.labels):
                    raise FolderError(
                        f"the model gives {logits.shape[-1]} classes but "
                        f"{SERVING_FILE} names {len(self.labels)}: write the "
                        f"folder again with grainfx compress"
                    )
                for row in logits.float().softmax(-1).tolist():
                    best = max(range(len(row)), key=row.__getitem__)
                    out.append(
                        Prediction(
                            self.labels[best], row[best], dict(zip(self.labels, row, strict=False))
                        )
                    )
        return out

    def __call__(self, texts: str | Sequence[str] | None = None, /, **inputs: torch.Tensor) -> Any:
        if inputs:
            if texts is not None:
                raise TypeError("give texts or tensors, not both")
            return self.module(**inputs)
        single = isinstance(texts, str)
        texts = [texts] if isinstance(texts, str) else texts
        if texts is None or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                "call with a text, a non-empty list of texts, or the model's "
                "tensors (input_ids=..., attention_mask=...)"
            )
        if self.serving.task == "classification":
            predictions = self.predict(texts)
            return predictions[0] if single else predictions
        with torch.inference_mode():
            return self.module(**self.encode(texts))

    def __repr__(self) -> str:
        return (
            f"Predictor({self.serving.task}, labels={list(self.labels)}, "
            f"max_length={self.serving.max_length})"
        )


def load_folder(folder: str | os.PathLike) -> Predictor:
    """The :class:`Predictor` of an output folder written by ``grainfx compress``."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    for name in ("model.pt2", "tokenizer.json", SERVING_FILE):
        if not (folder / name).is_file():
            raise FolderError(
                f"{folder} has no {name}: pass a folder written by grainfx "
                f"compress (or a .pt2 file to load the module alone)"
            )
    serving = Serving.read(folder / SERVING_FILE)
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 (tokenizers raises plain Exception)
        raise FolderError(
            f"{folder / 'tokenizer.json'} is not a readable tokenizer ({exc})".splitlines()[0]
        ) from None
    module = passes.load(folder / "model.pt2")
    _check_fit(folder / SERVING_FILE, serving, tokenizer, module)
    return Predictor(module, tokenizer, serving)


def positions(module: torch.nn.Module) -> int | None:
    """The positions a model takes (the rows of its learned position embeddings), or None
    (none found: rotary or no positions)."""
    sizes = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith(POSITION_WEIGHTS) and tensor.dim() == 2:
            sizes.append(int(tensor.shape[0]))
        elif name.endswith("position_ids") and tensor.dim() >= 1:
            sizes.append(int(tensor.shape[-1]))
    return min(sizes, default=None)


def _check_fit(path: Path, serving: Serving, tokenizer: Tokenizer, module: torch.nn.Module) -> None:
    """Refuses a serving record whose values the tokenizer or the model cannot take."""
    fix = "write the folder again with grainfx compress"
    vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
    if serving.pad_id >= vocabulary:
        raise FolderError(
            f"{path}: pad_id {serving.pad_id} is outside the tokenizer's vocabulary "
            f"(ids 0..{vocabulary - 1}): {fix}"
        )
    found = tokenizer.token_to_id(serving.pad_token)
    if found != serving.pad_id:
        where = "not in the tokenizer's vocabulary" if found is None else f"id {found}"
        raise FolderError(
            f"{path}: pad_token {serving.pad_token!r:.40} is {where}, but pad_id is "
            f"{serving.pad_id}: {fix}"
        )
    limit = positions(module)
    if limit is not None and serving.max_length > limit:
        raise FolderError(
            f"{path}: max_length {serving.max_length} is more than the model's {limit} "
            f"positions: {fix}"
        )


def load(path: str | os.PathLike) -> Predictor | torch.nn.Module:
    """A compact model: a folder written by ``grainfx compress`` gives a :class:`Predictor`
    (callable on raw text and on tensors); a ``.pt2`` file gives the module alone."""
    if Path(path).is_dir():
        return load_folder(path)
    return passes.load(path)
