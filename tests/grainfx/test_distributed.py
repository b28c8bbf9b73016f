"""compress in a torch.distributed process group: 2 processes launched by torchrun (gloo, CPU)
end with the same masks on both ranks, equal to one process on the same global batches; a run
interrupted and resumed under torchrun ends the same; the command line under torchrun; gradient
accumulation; data sharding."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grainfx
from grainfx import distributed
from grainfx.data import LengthGroupedBatches
from grainfx.distributed import ShardedBatches
from tests.grainfx import distributed_worker as worker
from tests.grainfx.test_cli import OUTPUT_FILES, make_workdir

ROOT = Path(__file__).resolve().parents[2]


def assert_same_run(expected: dict, actual: dict, tol: float = 1e-4) -> None:
    """The same masks, and weights (of order 1) within ``tol``: relative, and absolute on
    values near 0 (the key biases, whose gradient is rounding noise, stay ~1e-6)."""
    assert expected["masks"].keys() == actual["masks"].keys()
    for name, mask in expected["masks"].items():
        assert torch.equal(mask, actual["masks"][name]), f"mask {name} differs"
    assert expected["weights"].keys() == actual["weights"].keys()
    for name, weight in expected["weights"].items():
        torch.testing.assert_close(actual["weights"][name], weight, rtol=tol, atol=tol / 10)


def torchrun(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``args`` run by torchrun in 2 processes of 1 thread each on this machine."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, "--standalone", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks of the worker wrote."""
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(["-m", "tests.grainfx.distributed_worker", str(out)])
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single() -> dict:
    """One process on the global batches (each the union of the ranks' halves)."""
    result = grainfx.compress(
        worker.student(),
        worker.global_batches(),
        worker.SPARSITY,
        teacher=worker.teacher(),
        config=worker.CONFIG,
        progress=False,
    )
    return worker.outcome(result)


def test_two_ranks_prune_the_same_masks_as_one_process_on_the_union(ranks, single):
    first, second = ranks[0]["straight"], ranks[1]["straight"]
    assert_same_run(first, second, tol=0.0)  # the ranks hold one model
    assert_same_run(single, first)
    assert any(not bool(m.all()) for m in first["masks"].values()), "nothing was pruned"
    assert first["report"]["world_size"] == 2 and single["report"]["world_size"] == 1
    assert first["report"]["density"] == pytest.approx(single["report"]["density"])


def test_latency_aware_ranks_share_one_set_of_prices(ranks):
    first, second = ranks[0]["latency_aware"], ranks[1]["latency_aware"]
    assert_same_run(first, second, tol=0.0)
    prices = first["report"]["latency_prices"]
    assert prices == second["report"]["latency_prices"]
    assert set(prices.values()) == {10.0}  # the mean of rank 0's 5 and rank 1's 15


def test_ranks_that_disagree_get_an_error_naming_what_differs(ranks):
    for rank in ranks:
        masks, steps = rank["errors"]
        assert "after step 3 the ranks hold different masks (first: 'b.ffn', kept 1 to 2)" in masks
        assert "the ranks disagree on the number of steps (4 to 5)" in steps


def test_a_run_resumed_under_torchrun_ends_as_the_uninterrupted_one(ranks):
    for rank in ranks:
        assert_same_run(rank["straight"], rank["resumed"], tol=1e-6)


def test_accumulated_micro_batches_step_as_one_batch_of_their_union(single):
    halves = [
        half for b in worker.global_batches() for r in range(2) for half in worker.shard([b], r, 2)
    ]
    accumulated = grainfx.compress(
        worker.student(),
        halves,
        worker.SPARSITY,
        teacher=worker.teacher(),
        config=dataclasses.replace(worker.CONFIG, accumulate=2),
        progress=False,
    )
    assert_same_run(single, worker.outcome(accumulated))
    assert accumulated.report["steps"] == single["report"]["steps"] == worker.CONFIG.steps


def test_the_command_line_under_torchrun_writes_one_output_from_rank_0(tmp_path):
    """With gradient accumulation: each step, 2 micro-batches of 2 texts on each rank."""
    workdir = make_workdir(tmp_path)
    done = torchrun(
        ["-m", "grainfx", "compress", "model", "--data", "data.csv", "--out", "out"]
        + ["--sparsity", "0.8", "--steps", "4", "--batch-size", "8", "--accumulate", "2"]
        + ["--threads", "1", "--quiet"],
        cwd=workdir,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("student accuracy") == 1, done.stdout
    assert sorted(p.name for p in (workdir / "out").iterdir()) == OUTPUT_FILES
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4
    assert report["config"]["accumulate"] == 2  # micro-batches of 2 texts under DDP's no_sync
    assert not (workdir / "out.checkpoint.pt").exists()


def test_accumulate_is_validated_and_counts_epochs_in_steps():
    with pytest.raises(grainfx.ConfigError, match="accumulate must be an int >= 1"):
        grainfx.GrainConfig(accumulate=0)
    with pytest.raises(grainfx.ConfigError, match="accumulate must be an int"):
        grainfx.GrainConfig(accumulate=2.0)  # type: ignore[arg-type]
    from grainfx.compress import _total_steps

    assert _total_steps(list(range(10)), grainfx.GrainConfig(epochs=2, accumulate=4)) == 5


def test_sharded_batches_split_every_batch_among_ranks_and_micro_batches():
    lengths = list(range(103))

    def sampler() -> LengthGroupedBatches:
        return LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(3))

    whole = list(sampler())
    assert sampler().sizes() == sorted((len(b) for b in whole), reverse=True)
    shares = [list(ShardedBatches(sampler(), rank, 2, micro=2)) for rank in range(2)]
    # the last batch (7 of 103) is split in 4, the others in 4 x 2; none is left out
    assert [len(s) for s in shares] == [len(ShardedBatches(sampler(), r, 2, 2)) for r in range(2)]
    for index, batch in enumerate(whole):
        parts = shares[0][2 * index : 2 * index + 2] + shares[1][2 * index : 2 * index + 2]
        assert sorted(i for p in parts for i in p) == sorted(batch)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    tiny = ShardedBatches(LengthGroupedBatches([1] * 9, 8, torch.Generator()), 1, 2, micro=2)
    assert len(tiny) == len(list(tiny)) == 2, "the batch of 1 example is left out"


def test_outside_a_process_group_compress_is_one_rank():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.backend_for("cuda:0") == "nccl"
    assert distributed.backend_for("cpu") == "gloo"
    assert not distributed.init_from_env("cpu")  # WORLD_SIZE unset: nothing to join


def test_cycle_gives_a_distributed_sampler_each_pass_number():
    from grainfx.compress import cycle

    examples = list(range(16))
    sampler = torch.utils.data.DistributedSampler(examples, num_replicas=2, rank=1, seed=0)
    loader = torch.utils.data.DataLoader(examples, batch_size=8, sampler=sampler)
    got = [b.tolist() for b in cycle(loader, 3)]
    expected = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        expected.append(next(iter(loader)).tolist())
    assert got == expected and expected[0] != expected[1]
