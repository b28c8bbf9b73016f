"""Latency measurement that holds up on a shared machine: interleaved calls, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

from passes.record import InputSpec


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn (one call each per round).

    Every function is called once untimed first (warm-up, and compilation for compiled
    modules). Ratios of these medians are stable even when another process shares the CPU.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def example_inputs(specs: Mapping[str, InputSpec], batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random inputs of ``batch`` x ``seq`` for a saved model, from the input specs its file
    records (``module.grainfx_inputs``): token ids below the recorded maximum, masks of ones,
    floats from a normal distribution."""
    inputs = {}
    gen = torch.Generator().manual_seed(0)
    for name, spec in specs.items():
        shape = list(spec.shape)
        shape[0] = batch
        if len(shape) == 2:
            shape[1] = seq
        dtype = spec.torch_dtype
        if dtype.is_floating_point:
            inputs[name] = torch.randn(shape, dtype=dtype, generator=gen)
        elif "mask" in name:
            inputs[name] = torch.ones(shape, dtype=dtype)
        else:
            inputs[name] = torch.randint(0, (spec.max or 0) + 1, shape, dtype=dtype, generator=gen)
    if not inputs:
        raise ValueError("the file records no inputs: save it again with this grainfx version")
    return inputs
