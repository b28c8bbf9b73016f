"""One rank of the 2-process runs of test_distributed.py (launched there with torchrun), and
the model, data and settings that the test's 1-process reference run shares with it.

Each rank compresses its half of every global batch three times: straight through; stopped by
a KeyboardInterrupt after step STOP (rank 0 saves a checkpoint); and resumed from that
checkpoint. Then it makes the ranks disagree on masks and on the run's length. It writes the
masks, the student's weights and the report of the straight and the resumed run, and the
errors, to OUT/rank{rank}.pt.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

import grainfx
from grainfx import distributed, importance
from tests.models import build_bert

SPARSITY = 0.6
#: No dropout, so that one process on a batch and two on its halves compute the same losses.
CONFIG = grainfx.GrainConfig(
    steps=8, learning_rate=1e-3, prune_start=0.25, prune_end=0.75, ema_beta=0.5
)
STOP = 4  # the interrupted run stops after this step index
GLOBAL_BATCH, SEQ, BATCHES = 8, 10, 4


def student() -> torch.nn.Module:
    return build_bert(dropout=0.0)


def teacher() -> torch.nn.Module:
    """Another random model: a student distilled from itself has no gradient."""
    return build_bert(dropout=0.0, seed=1)


def global_batches() -> list[dict[str, torch.Tensor]]:
    """Unpadded batches (equal lengths: the mean over a batch is the mean of its halves')."""
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(5, 90, (GLOBAL_BATCH, SEQ), generator=gen),
            "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long),
        }
        for _ in range(BATCHES)
    ]


def shard(batches: list[dict], rank: int, ranks: int) -> list[dict]:
    """Rank ``rank``'s contiguous share of every batch."""
    size = GLOBAL_BATCH // ranks
    return [{k: v[rank * size : (rank + 1) * size] for k, v in b.items()} for b in batches]


def outcome(result: grainfx.CompressionResult) -> dict:
    assert result.masked is not None
    return {
        "masks": result.masks,
        "weights": {k: v for k, v in result.masked.state_dict().items() if "mask" not in k},
        "report": result.report,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu"), "run me under torchrun with 2 processes"
    rank, ranks = distributed.world()
    data = shard(global_batches(), rank, ranks)
    run = dict(teacher=teacher(), config=CONFIG, progress=False)
    straight = grainfx.compress(student(), data, SPARSITY, **run)

    path = out / "state.pt"

    def stop(step: int, masks: dict) -> None:
        if step == STOP:
            raise KeyboardInterrupt

    try:
        grainfx.compress(
            student(),
            data,
            SPARSITY,
            callback=stop,
            checkpoint=grainfx.CheckpointConfig(path, every=100),
            **run,
        )
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    dist.barrier()  # rank 0 has written the checkpoint
    resumed = grainfx.compress(
        student(),
        data,
        SPARSITY,
        checkpoint=grainfx.CheckpointConfig(path, every=100, resume=True),
        **run,
    )
    # latency-aware ranking with prices that differ per rank (as measured ones would): the
    # ranks must rank with one set of prices, else the mask checksum stops the run
    importance.head_prices = lambda structure, shape: {
        b.mask_names()["qk"]: 5.0 + 10.0 * rank for b in structure.attention
    }
    aware = grainfx.compress(
        student(), data, SPARSITY, **{**run, "config": replace(CONFIG, latency_aware=True)}
    )
    errors = []
    masks = {"a.vo": torch.ones(2, 3), "b.ffn": torch.tensor([1.0, float(rank)])}
    for check in (
        lambda: distributed.check_same_masks(masks, 3),
        lambda: distributed.check_same_int(4 + rank, "the number of steps", "fix"),
    ):
        try:
            check()
            errors.append("no error")
        except distributed.DistributedError as exc:
            errors.append(str(exc))
    torch.save(
        {
            "straight": outcome(straight),
            "resumed": outcome(resumed),
            "latency_aware": outcome(aware),
            "errors": errors,
        },
        out / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
