"""How heads of unequal sizes share attention calls: the bucket granularity of one block.

Heads whose query and value sizes round up to the same multiple of the granularity ``g``
share one ``scaled_dot_product_attention`` call, zero-padded to that size. A small ``g``
pads little but makes more calls; a large one makes few calls of padded heads; and the
kernel's speed is far from linear in the head size (on this project's CPU one head of 16 + 16
dims ran faster than one of 8 + 8). ``rewrite(bucket="auto")`` therefore measures: for each
candidate ``g`` it times, on this machine at the shape the model will serve, each bucket's
eager work at its padded sizes (its Q, K and V projections, the head split, sdpa, the merge
and its share of the output projection, on random inputs; median of a few calls, each
distinct size timed once) and keeps the cheapest ``g``, the largest of those within
:data:`TOLERANCE` of it (fewer shapes to compile, and a choice that timing noise does not flip
between near-equal options).

Measured seconds are kept in ``$GRAINFX_CACHE/bucket_seconds.json`` (default
``~/.cache/grainfx``), keyed by torch version, processor, thread count and shape, so every
later rewrite on this machine reads them instead of timing again: the same masks give the
same compact graph, run after run. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "CANDIDATES",
    "TOLERANCE",
    "BucketTimer",
    "choose_granularity",
    "default_cache",
    "round_up",
]

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
TOLERANCE = 0.03

#: a bucket: (padded rotary pairs, padded other query dims, padded value dims) -> its heads
Buckets = dict[tuple[int, int, int], list[int]]


def round_up(n: int, step: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``step``, at most ``cap``; 0 stays 0."""
    if n == 0:
        return 0
    return min(cap, -(-n // step) * step)


def default_cache() -> Path:
    """``$GRAINFX_CACHE/bucket_seconds.json``, by default under ``~/.cache/grainfx``."""
    folder = os.environ.get("GRAINFX_CACHE") or Path.home() / ".cache" / "grainfx"
    return Path(folder) / "bucket_seconds.json"


class BucketTimer:
    """Seconds of one bucket's work at ``shape`` = (batch, sequence), measured once per
    (model width, heads, query width, value width) on this machine and remembered, in
    ``cache`` (a JSON file; None: in memory only) across processes."""

    def __init__(self, shape: tuple[int, int], reps: int = 5, cache: Path | None = None):
        self.shape = shape
        self.reps = reps
        self.cache = cache
        self._machine = (
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cpus, {torch.get_num_threads()} threads, "
            f"{shape[0]}x{shape[1]}"
        )
        self._seconds: dict[str, float] = self._read().get(self._machine, {})
        self._new = False

    def __call__(self, hidden: int, heads: int, q_width: int, v_width: int) -> float:
        key = f"{hidden},{heads},{q_width},{v_width}"
        if key not in self._seconds:
            self._seconds[key] = self._measure(hidden, heads, q_width, v_width)
            self._new = True
        return self._seconds[key]

    def _read(self) -> dict:
        try:
            record = json.loads(self.cache.read_text()) if self.cache else {}
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def save(self) -> None:
        """Add what was measured to the cache file (written whole, then renamed into place)."""
        if not self._new or self.cache is None:
            return
        record = self._read()
        record[self._machine] = {**record.get(self._machine, {}), **self._seconds}
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".bucket_seconds.", dir=self.cache.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache)
        except OSError:
            return
        self._new = False

    def _measure(self, hidden: int, heads: int, q_width: int, v_width: int) -> float:
        batch, seq = self.shape
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, seq, hidden, generator=gen)
        w_in = torch.randn(heads * (2 * q_width + v_width), hidden, generator=gen)
        w_out = torch.randn(hidden, heads * v_width, generator=gen)
        split = [heads * q_width, heads * q_width, heads * v_width]

        def call() -> torch.Tensor:
            q, k, v = F.linear(x, w_in).split(split, dim=-1)
            q, k = (t.unflatten(-1, (heads, q_width)).transpose(1, 2) for t in (q, k))
            v = v.unflatten(-1, (heads, v_width)).transpose(1, 2)
            ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
            return F.linear(ctx, w_out)

        seconds = []
        with torch.inference_mode():
            call()
            for _ in range(self.reps):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    def seconds(self, hidden: int, buckets: Buckets) -> float:
        """Measured seconds of all the buckets of ``buckets`` in a model ``hidden`` wide."""
        return sum(self(hidden, len(h), 2 * wp + ws, wv) for (wp, ws, wv), h in buckets.items())


def choose_granularity(
    hidden: int, head_dim: int, buckets_at: Callable[[int], Buckets], timer: BucketTimer
) -> int:
    """The granularity among :data:`CANDIDATES` below ``head_dim``, and ``head_dim`` itself,
    whose buckets, ``buckets_at(g)``, run fastest by ``timer``: the largest within
    :data:`TOLERANCE` of the fastest."""
    options = sorted({g for g in CANDIDATES if g < head_dim} | {head_dim})
    costs = {g: timer.seconds(hidden, buckets_at(g)) for g in options}
    best = min(costs.values())
    return max(g for g in options if costs[g] <= best * (1 + TOLERANCE))
