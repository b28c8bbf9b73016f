"""Dense vs compact speed of the rewrite on a BERT-base-size random model.

For each kept share of units (spread over all heads, or concentrated in few heads) and each
bucketing choice, times the compact GraphModule against the dense model, eager and under
torch.compile, with 1 and 2 threads, interleaved runs, medians. Beside each measured speedup it
writes two references: the FLOPs ratio, and the speedup of a uniform model doing the same work
in the most regular shape (one head of the kept size per layer, FFN of the kept width), the
practical limit on this CPU. Results go to benchmarks/results/rewrite_speed.json as they are
measured; a rerun skips what is there (delete the file to start over).

    python benchmarks/rewrite_speed.py                 # the full run (about an hour here)
    python benchmarks/rewrite_speed.py --quick         # a tiny model, seconds (used by tests)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Compile times are measured cold: no inductor cache may serve a later model.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import passes  # noqa: E402
from benchmarks.common import RESULTS, ResultStore, machine  # noqa: E402
from grainfx.timing import interleaved_medians  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    ffn: int
    layers: int
    vocab: int
    batch: int
    seq: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


BERT_BASE = Shape(hidden=768, heads=12, ffn=3072, layers=12, vocab=30522, batch=8, seq=128)
TINY = Shape(hidden=64, heads=4, ffn=128, layers=2, vocab=100, batch=2, seq=16)


def dense_model(shape: Shape) -> nn.Module:
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        intermediate_size=shape.ffn)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BertModel(config).eval()


def inputs_for(shape: Shape) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen),
            "attention_mask": torch.ones(shape.batch, shape.seq, dtype=torch.long)}


def masks_for(structure: passes.Structure, shape: Shape, kept: float, pattern: str
              ) -> dict[str, torch.Tensor]:
    """Masks keeping ``kept`` of each unit kind: spread evenly over all heads, packed in few
    heads (concentrated), or scattered at random so that heads have unequal sizes."""
    gen = torch.Generator().manual_seed(1)
    d = shape.head_dim
    masks = {}
    for name, size in structure.mask_shapes().items():
        mask = torch.zeros(size)
        if len(size) == 1:
            mask[torch.randperm(size[0], generator=gen)[:max(1, round(kept * size[0]))]] = 1
        elif pattern == "spread":
            per_head = max(1, round(kept * d))
            for h in range(size[0]):
                mask[h, torch.randperm(d, generator=gen)[:per_head]] = 1
        elif pattern == "unequal":
            flat = torch.zeros(size.numel())
            count = max(1, round(kept * flat.numel()))
            flat[torch.randperm(size.numel(), generator=gen)[:count]] = 1
            mask = flat.view(size)
        else:
            mask.view(-1)[:max(1, round(kept * size.numel()))] = 1
        masks[name] = mask
    return masks


class UniformLayer(nn.Module):
    """One post-LN encoder layer with a single head of ``nq`` / ``nv`` dims and FFN ``width``."""

    def __init__(self, hidden: int, nq: int, nv: int, width: int, head_dim: int):
        super().__init__()
        self.nq, self.nv, self.scale = nq, nv, 1 / math.sqrt(head_dim)
        self.qkv = nn.Linear(hidden, 2 * nq + nv)
        self.o = nn.Linear(nv, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up, self.down = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.nq, self.nq, self.nv], -1)
        ctx = nn.functional.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mask, scale=self.scale).squeeze(1)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))


class UniformModel(nn.Module):
    """The same kept work in the most regular shape: the practical speed limit.

    ``nq``, ``nv``, ``width``: kept query / value dims and FFN width, one number for every
    layer or a list with one per layer."""

    def __init__(self, shape: Shape, nq, nv, width):
        super().__init__()
        per_layer = [v if isinstance(v, list) else [v] * shape.layers for v in (nq, nv, width)]
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.ln = nn.LayerNorm(shape.hidden)
        self.layers = nn.ModuleList(UniformLayer(shape.hidden, q, v, w, shape.head_dim)
                                    for q, v, w in zip(*per_layer))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.embed(input_ids))
        mask = attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        return x


def flops(shape: Shape, q_units: int, v_units: int, width: int) -> float:
    """Multiply-adds x 2 per forward for layers with these unit counts (embeddings excluded)."""
    tokens, d = shape.batch * shape.seq, shape.hidden
    proj = 2 * tokens * d * (2 * q_units + 2 * v_units + 2 * width)
    attn = 2 * tokens * shape.seq * (q_units + v_units)
    return shape.layers * (proj + attn)


#: First-call time of each model compiled in this process, by id: the dense model is compiled
#: once, later torch.compile calls on it hit dynamo's cache, so its first time is reported.
_FIRST_COMPILE: dict[int, float] = {}


def measure(label: str, models: dict[str, nn.Module], inputs: dict, reps: int,
            compiled: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Median latency of each model (and its compile time when ``compiled``)."""
    compile_s = {}
    fns = {}
    for name, model in models.items():
        fn = torch.compile(model) if compiled else model
        start = time.perf_counter()
        with torch.inference_mode():
            fn(**inputs)
        compile_s[name] = _FIRST_COMPILE.setdefault(id(model), time.perf_counter() - start)
        fns[name] = (lambda f=fn: f(**inputs))
    print(f"  timing {label}: {', '.join(models)}", flush=True)
    return interleaved_medians(fns, reps), compile_s


def run(shape: Shape, kept_shares: list[float], patterns: list[str], buckets: list[int],
        compile_buckets: list[int], threads: list[int], compile_threads: list[int], reps: int,
        out: Path) -> ResultStore:
    store = ResultStore(out, {"machine": machine(), "shape": shape.__dict__, "reps": reps})
    dense = dense_model(shape)
    inputs = inputs_for(shape)
    gm = passes.capture(dense, inputs)
    structure = passes.discover(gm)
    masked = passes.instrument(gm, structure)
    dense_flops = flops(shape, shape.heads * shape.head_dim, shape.heads * shape.head_dim,
                        shape.ffn)
    for n_threads in sorted(set(threads) | set(compile_threads)):
        torch.set_num_threads(n_threads)
        modes = (["eager"] if n_threads in threads else []) + (
            ["compiled"] if n_threads in compile_threads else [])
        for mode in modes:
            for kept in kept_shares:
                for pattern in patterns:
                    key = f"threads={n_threads}/{mode}/kept={kept}/{pattern}"
                    if key in store:
                        continue
                    masks = masks_for(structure, shape, kept, pattern)
                    passes.set_masks(masked, masks)
                    chosen = buckets if mode == "eager" else compile_buckets
                    models: dict[str, nn.Module] = {"dense": dense}
                    for b in chosen:
                        models[f"bucket={b}"] = passes.rewrite(masked, structure, bucket=b)
                    if mode == "eager":
                        models["bucket=%d,unmerged" % passes.DEFAULT_BUCKET] = passes.rewrite(
                            masked, structure, merge_projections=False)
                    nq = int(masks["attn0.qk"].sum())
                    nv = int(masks["attn0.vo"].sum())
                    width = int(masks["ffn0"].sum())
                    torch.manual_seed(0)
                    models["uniform"] = UniformModel(shape, nq, nv, width).eval()
                    print(f"{key}: density {structure.density(masks):.3f}", flush=True)
                    medians, compile_s = measure(key, models, inputs, reps, mode == "compiled")
                    speedups = {n: medians["dense"] / t for n, t in medians.items()}
                    store.put(key, {
                        "threads": n_threads, "mode": mode, "kept": kept, "pattern": pattern,
                        "density": structure.density(masks),
                        "seconds": medians, "speedup": speedups,
                        "flops_ratio": dense_flops / flops(shape, nq, nv, width),
                        "uniform_speedup": speedups["uniform"],
                        "compile_seconds": compile_s if mode == "compiled" else None,
                    })
                    best = max((s for n, s in speedups.items() if n.startswith("bucket")))
                    print("  speedups: " + ", ".join(f"{n} {s:.2f}x" for n, s in
                                                      speedups.items()) +
                          f" | best compact / uniform {best / speedups['uniform']:.0%}",
                          flush=True)
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for smoke tests")
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--patterns", nargs="+", default=["spread", "concentrated", "unequal"])
    parser.add_argument("--buckets", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    parser.add_argument("--compile-buckets", type=int, nargs="+", default=[4, 8, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile-threads", type=int, nargs="*", default=[1],
                        help="thread counts to time torch.compile'd models at (none: skip)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "rewrite_speed.json")
    args = parser.parse_args(argv)
    shape = TINY if args.quick else BERT_BASE
    run(shape, args.kept, args.patterns, args.buckets, args.compile_buckets, args.threads,
        args.compile_threads, args.reps, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
