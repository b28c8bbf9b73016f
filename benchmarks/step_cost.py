"""Cost of one GRAIN pruning step vs one plain distillation step of the same model.

Plain step: teacher forward, student forward, logit KD + hidden-state loss, one backward,
AdamW. GRAIN step: the same plus the mask-gradient pass of gradient separation, the importance
update and the global re-ranking of all units (pruning phase). Both run on
all-MiniLM-L6-v2 with Rotten Tomatoes batches (batch 32, dynamic padding), interleaved, medians.
Writes benchmarks/results/step_cost.json.

    python benchmarks/step_cost.py [--threads 1] [--steps 12] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, ResultStore, machine  # noqa: E402
from grainfx import GrainConfig  # noqa: E402
from grainfx.compress import prepare  # noqa: E402


def minilm_batches(count: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from grainfx import demo
    from grainfx.data import text_batches

    tokenizer = AutoTokenizer.from_pretrained(demo.minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        demo.minilm_path(), num_labels=2
    ).eval()
    train, _ = demo.rotten_tomatoes()
    batches = []
    for batch in text_batches(train, tokenizer, 32, shuffle=True):
        batch.pop("labels")
        batches.append(batch)
        if len(batches) == count:
            break
    return model, batches


def tiny_batches(count: int):
    from tests.models import build, example_inputs

    return build("bert-sdpa"), [example_inputs("bert-sdpa", 4, 12, seed=i) for i in range(count)]


def plain_step(trainer, batch) -> None:
    kd, hidden = trainer.losses(batch)
    (kd if hidden is None else kd + hidden).backward()
    torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, batches = (tiny_batches if args.quick else minilm_batches)(args.steps + 1)
    total = 10 * (args.steps + 1)
    # prune_start 0: every timed GRAIN step ranks all units and updates the masks
    config = GrainConfig(steps=total, prune_start=0.0, prune_end=1.0, learning_rate=1e-6)
    trainer = prepare(model, batches[0], 0.9, teacher=None, config=config, total_steps=total)
    trainer.student.train.train()
    plain_step(trainer, batches[0])
    trainer.step(0, batches[0])
    times = {"plain": [], "grain": []}
    for i, batch in enumerate(batches[1:], start=1):
        for kind in ("plain", "grain"):
            start = time.perf_counter()
            if kind == "plain":
                plain_step(trainer, batch)
            else:
                trainer.step(i, batch)
            times[kind].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["grain"] / medians["plain"]
    store = ResultStore(args.out, {"machine": machine()})
    store.put(
        f"{'tiny' if args.quick else 'minilm'}/threads={args.threads}",
        {
            "threads": args.threads,
            "steps": args.steps,
            "seconds": medians,
            "ratio": ratio,
            "model": "tiny BERT" if args.quick else "all-MiniLM-L6-v2, RT batch 32",
        },
    )
    print(
        f"plain distillation step {medians['plain']:.3f} s, GRAIN step {medians['grain']:.3f} s:"
        f" {ratio:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
