"""Steps per second of grainfx.compress in 1 and 2 processes (torchrun, gloo, 1 thread each).

The same run split over the processes: all-MiniLM-L6-v2 distilled from the demo teacher on
Rotten Tomatoes, a global batch of 32 (16 a process with 2), the GRAIN step with its pruning
phase; ``--warmup`` steps, then ``--steps`` timed ones (the callback's clock on rank 0, with
its CPU time: a share well under 1 means the cores were busy with something else). The
scaling efficiency is the speed-up of 2 processes over 1, divided by 2, in wall time and in
rank 0's CPU seconds a step (which cores shared with other jobs distort less). Each process
count is one record of benchmarks/results/distributed.json; a record already there is kept
(delete it, or pass --force, to measure again).

    python benchmarks/distributed.py [--steps 20] [--processes 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, ResultStore, machine  # noqa: E402

BATCH = 32


def _data(quick: bool, rank: int, ranks: int, count: int) -> tuple:
    """(student, teacher, this rank's batches) of the run."""
    if quick:
        from tests.models import build_bert, example_inputs

        inputs = [example_inputs("bert-sdpa", 8, 12, seed=i) for i in range(count)]
        share = [{k: v[rank::ranks] for k, v in b.items()} for b in inputs]
        return build_bert(), build_bert(seed=1), share
    from transformers import AutoModelForSequenceClassification

    from grainfx import demo, distributed
    from grainfx.data import text_batches

    train, _ = demo.rotten_tomatoes()
    with distributed.main_first():  # rank 0 fine-tunes the teacher when it is not cached
        teacher, tokenizer = demo.teacher(train, progress=False)
    student = AutoModelForSequenceClassification.from_pretrained(
        demo.minilm_path(), num_labels=2
    ).eval()
    batches = text_batches(
        train, tokenizer, BATCH, shuffle=True, group_by_length=True, shard=(rank, ranks, 1)
    )
    return student, teacher, batches


def worker(args: argparse.Namespace) -> None:
    """One rank: compress for warmup + steps, rank 0 writes the timed seconds to args.worker."""
    import grainfx
    from grainfx import distributed

    torch.set_num_threads(1)
    created = distributed.init_from_env("cpu")
    rank, ranks = distributed.world()
    total = args.warmup + args.steps
    student, teacher, batches = _data(args.quick, rank, ranks, total)
    clock: list[tuple[float, float]] = []
    grainfx.compress(
        student,
        batches,
        0.9,
        teacher=teacher,
        config=grainfx.GrainConfig(steps=total, learning_rate=1e-4),
        progress=False,
        callback=lambda step, masks: clock.append((time.perf_counter(), time.process_time())),
    )
    if rank == 0:
        (wall0, cpu0), (wall1, cpu1) = clock[args.warmup - 1], clock[-1]
        timing = {"seconds": wall1 - wall0, "cpu_share": (cpu1 - cpu0) / (wall1 - wall0)}
        Path(args.worker).write_text(json.dumps(timing))
    if created:
        torch.distributed.destroy_process_group()


def measure(processes: int, args: argparse.Namespace) -> dict:
    """Run the workers under torchrun; the record of ``processes``."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "timing.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(processes), str(Path(__file__).resolve())]
        command += ["--worker", str(result), "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{processes} processes failed:\n{done.stderr[-4000:]}")
        timing = json.loads(result.read_text())
    seconds = timing["seconds"]
    return {
        "processes": processes,
        "threads_each": 1,
        "steps": args.steps,
        "seconds": seconds,
        "steps_per_second": args.steps / seconds,
        # rank 0's CPU time over its wall time: well under 1 when the cores were shared or
        # the process waited for the others
        "cpu_share": timing["cpu_share"],
        "global_batch": 8 if args.quick else BATCH,
        "model": "tiny BERT" if args.quick else "all-MiniLM-L6-v2, RT batch 32",
        "load_before": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the clock starts")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--force", action="store_true", help="measure recorded counts again")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.worker is not None:
        worker(args)
        return 0
    store = ResultStore(args.out, {"machine": machine()})
    name = "tiny" if args.quick else "minilm"
    for processes in args.processes:
        key = f"{name}/processes={processes}"
        if key in store and not args.force:
            print(f"{key}: recorded, kept")
            continue
        record = measure(processes, args)
        store.put(key, record)
        print(f"{key}: {record['steps_per_second']:.3f} steps/s")
    one, two = (store.records.get(f"{name}/processes={n}") for n in (1, 2))
    if one is not None and two is not None:
        speedup = two["steps_per_second"] / one["steps_per_second"]
        # the same on CPU time (rank 0's), which the other jobs on shared cores distort less
        cpu = {str(r["processes"]): r["cpu_share"] / r["steps_per_second"] for r in (one, two)}
        cpu_speedup = cpu["1"] / cpu["2"]
        scaling = {
            "speedup": speedup,
            "efficiency": speedup / 2,
            "cpu_seconds_per_step": cpu,
            "cpu_efficiency": cpu_speedup / 2,
        }
        store.put(f"{name}/scaling", scaling)
        print(
            f"2 processes: {speedup:.2f}x the steps per second of 1, efficiency {speedup / 2:.0%};"
            f" in rank 0's CPU seconds a step, efficiency {cpu_speedup / 2:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
