"""Several processes with torch.distributed (launched by torchrun): who this process is, the
collectives compress needs, and the data sharding of the command line.

compress runs in one process when no process group is initialised. Inside one (``torchrun
--nproc-per-node N ...`` then :func:`init_from_env`, or the user's own
``torch.distributed.init_process_group``) every rank reads its own share of the batches,
the student's train graph and the hidden-state maps run under DistributedDataParallel (weight
gradients averaged), the mask gradients and losses are averaged before the importance EMA (so
every rank ranks the same units), the masks are compared by checksum at every pruning step, and
rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from passes.errors import PassError


class DistributedError(PassError, RuntimeError):
    """The ranks of a run disagree (masks, run length) or the process group does not fit."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes and shows progress."""
    return world()[0] == 0


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Within: rank 0 runs first, the other ranks after it is done (what rank 0 caches on
    disk, they read)."""
    ranks = world()[1]
    if ranks > 1 and not is_main():
        dist.barrier()
    yield
    if ranks > 1 and is_main():
        dist.barrier()


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for tensors on ``device``: nccl on CUDA, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE`` > 1),
    with the backend of ``device``; returns True when this call initialised it (the caller then
    destroys it). Outside torchrun, or when a group is already initialised, does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device))
    return True


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` under DistributedDataParallel in a process group, else itself. Buffers
    (the masks) are not broadcast at every forward: the ranks keep them equal themselves, and
    :func:`check_same_masks` checks that they do."""
    if world()[1] == 1:
        return module
    # forward_sync_buffers=False: no broadcast at every forward (the sync at init stays)
    return torch.nn.parallel.DistributedDataParallel(module, forward_sync_buffers=False)


def check_backend(device: torch.device) -> None:
    """Raise DistributedError when the group's backend cannot carry tensors on ``device``
    (nccl with CPU tensors)."""
    backend = dist.get_backend()
    if device.type != "cuda" and backend == "nccl":
        raise DistributedError(
            f"the process group uses nccl but the model is on {device}: nccl carries GPU "
            f"tensors only; init_process_group('gloo') for a CPU run, or move the model to "
            f"the GPU"
        )


def average(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks of each tensor (one all-reduce of them all, flattened); in a single
    process the tensors themselves."""
    if world()[1] == 1:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    parts = flat.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors, strict=True)]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is True on any rank (every rank gets the same answer)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _spread(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over ranks, min over ranks) of ``values``, with one all-reduce."""
    both = torch.cat([values, -values])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[: len(values)], -both[len(values) :]


def check_same_masks(masks: Mapping[str, torch.Tensor], step: int) -> None:
    """Raise DistributedError, on every rank, when the ranks' ``masks`` differ: per mask its
    kept count and a position-weighted sum, compared across ranks in one all-reduce."""
    if world()[1] == 1:
        return
    sums = []
    for mask in masks.values():
        flat = mask.detach().reshape(-1).double()
        positions = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        sums += [flat.sum(), (flat * positions).sum()]
    checksum = torch.stack(sums)
    high, low = _spread(checksum)
    differ = (high != low).view(-1, 2).any(dim=1)
    if bool(differ.any()):
        name = list(masks)[int(torch.nonzero(differ)[0])]
        raise DistributedError(
            f"after step {step} the ranks hold different masks (first: {name!r}, kept "
            f"{low.view(-1, 2)[int(torch.nonzero(differ)[0]), 0]:.0f} to "
            f"{high.view(-1, 2)[int(torch.nonzero(differ)[0]), 0]:.0f}): every rank must run "
            f"the same model, settings and grainfx version, on as many batches"
        )


def check_same_int(value: int, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Raise DistributedError, on every rank, when ``value`` differs between ranks."""
    if world()[1] == 1:
        return
    high, low = _spread(torch.tensor([float(value)], dtype=torch.float64, device=device))
    if high.item() != low.item():
        raise DistributedError(
            f"the ranks disagree on {what} ({low.item():.0f} to {high.item():.0f}): {fix}"
        )


class ShardedBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's share of the batches of ``batches`` (a batch sampler): every batch is split
    into ``ranks * micro`` contiguous parts of (nearly) equal size, and rank ``rank`` takes parts
    ``rank * micro`` to ``rank * micro + micro - 1``, one micro-batch each. The union over ranks
    and micro-batches is the batch a single process would take; a batch of fewer examples than
    parts is left out on every rank, so all ranks run as many steps. With the same seed every
    rank draws the same order of batches."""

    def __init__(
        self, batches: torch.utils.data.Sampler[list[int]], rank: int, ranks: int, micro: int = 1
    ):
        if not 0 <= rank < ranks or micro < 1:
            raise ValueError(f"rank {rank} of {ranks} with {micro} micro-batches")
        self.batches, self.rank, self.ranks, self.micro = batches, rank, ranks, micro

    @property
    def parts(self) -> int:
        return self.ranks * self.micro

    def __len__(self) -> int:
        # the sizes do not depend on the order: one pass over a fresh copy is not needed
        sizes = getattr(self.batches, "sizes", None)
        if sizes is None:
            raise TypeError("ShardedBatches needs a batch sampler with sizes()")
        return self.micro * sum(1 for size in sizes() if size >= self.parts)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) < self.parts:
                continue
            for part in range(self.rank * self.micro, (self.rank + 1) * self.micro):
                yield batch[part * len(batch) // self.parts : (part + 1) * len(batch) // self.parts]
