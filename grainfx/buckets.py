"""The measured cost model of ``bucket="auto"``: seconds of each bucket's attention calls on
this machine, timed once and kept in a cache file.

:func:`passes.rewrite` is a pure pass: with ``bucket="auto"`` it chooses each block's bucket
granularity by a cost model it is given (:mod:`passes.rewrite.buckets`). :class:`BucketTimer`
is the one grainfx gives: for each (model width, heads, query width, value width) it times the
bucket's eager work at the shape the model will serve (its Q, K and V projections, the head
split, sdpa, the merge and its share of the output projection, on random inputs; median of a
few calls). Measured seconds are kept in ``$GRAINFX_CACHE/bucket_seconds.json`` (default
``~/.cache/grainfx``), keyed by torch version, processor, thread count and shape, so every
later rewrite on this machine reads them instead of timing again: the same masks give the
same compact graph, run after run. A cache that cannot be read or written is ignored.
:func:`rewrite` is ``passes.rewrite`` with that choice.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

import passes
from passes.rewrite import DEFAULT_SHAPE
from passes.structure import Structure


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


def rewrite(
    masked_gm: fx.GraphModule,
    structure: Structure,
    *,
    shape: tuple[int, int] = DEFAULT_SHAPE,
    merge_projections: bool = True,
    cache: Path | None = None,
) -> fx.GraphModule:
    """:func:`passes.rewrite` with ``bucket="auto"`` priced by a :class:`BucketTimer` at
    ``shape`` on this machine, its measurements read from and added to ``cache`` (default
    :func:`default_cache`)."""
    timer = BucketTimer(shape, cache=default_cache() if cache is None else cache)
    compact = passes.rewrite(
        masked_gm,
        structure,
        bucket="auto",
        cost=timer,
        shape=shape,
        merge_projections=merge_projections,
    )
    timer.save()
    return compact
