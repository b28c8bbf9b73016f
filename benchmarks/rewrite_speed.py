"""Dense vs compact speed of the rewrite on a BERT-base-size random model.

For each kept share of units (spread over all heads, or concentrated in few heads) and each
bucketing choice, times the compact GraphModule against the dense model, eager and under
torch.compile, with 1 and 2 threads, interleaved runs, medians. Beside each measured speedup it
writes two references: the FLOPs ratio, and the speedup of a uniform model doing the same work
in the most regular shape (one head of the kept size per layer, FFN of the kept width), the
practical limit on this CPU. Results go to benchmarks/results/rewrite_speed.json as they are
measured; a rerun skips what is there (delete the file to start over).

The same for a Llama-shaped model (RoPE, grouped key/value heads, SwiGLU: 12 layers, hidden 768,
12 query heads in 4 key/value groups of head size 64, FFN 2048), eager, at batch 8 x seq 128 and
batch 1 x seq 512; its records are keyed ``llama/batch=B/seq=S/...`` in the same store.

    python benchmarks/rewrite_speed.py                 # the full run (about an hour here)
    python benchmarks/rewrite_speed.py --only llama --threads 1 --compile-threads
    python benchmarks/rewrite_speed.py --quick         # tiny models, seconds (used by tests)
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

    config = BertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ffn,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BertModel(config).eval()


def inputs_for(shape: Shape) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen),
        "attention_mask": torch.ones(shape.batch, shape.seq, dtype=torch.long),
    }


def masks_for(
    structure: passes.Structure, shape: Shape, kept: float, pattern: str
) -> dict[str, torch.Tensor]:
    """Masks keeping ``kept`` of each unit kind: spread evenly over all heads, packed in few
    heads (concentrated), or scattered at random so that heads have unequal sizes."""
    gen = torch.Generator().manual_seed(1)
    d = shape.head_dim
    masks = {}
    for name, size in structure.mask_shapes().items():
        mask = torch.zeros(size)
        if len(size) == 1:
            mask[torch.randperm(size[0], generator=gen)[: max(1, round(kept * size[0]))]] = 1
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
            mask.view(-1)[: max(1, round(kept * size.numel()))] = 1
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
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mask, scale=self.scale
        ).squeeze(1)
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
        self.layers = nn.ModuleList(
            UniformLayer(shape.hidden, q, v, w, shape.head_dim)
            for q, v, w in zip(*per_layer, strict=False)
        )

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


def measure(
    label: str, models: dict[str, nn.Module], inputs: dict, reps: int, compiled: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Median latency of each model (and its compile time when ``compiled``: dynamo's cache is
    cleared first, so a model of the same shapes as one compiled before pays in full)."""
    compile_s = {}
    fns = {}
    if compiled:
        torch._dynamo.reset()
    for name, model in models.items():
        fn = torch.compile(model) if compiled else model
        start = time.perf_counter()
        with torch.inference_mode():
            fn(**inputs)
        compile_s[name] = time.perf_counter() - start
        fns[name] = lambda f=fn: f(**inputs)
    print(f"  timing {label}: {', '.join(models)}", flush=True)
    return interleaved_medians(fns, reps), compile_s


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int
    vocab: int
    batch: int
    seq: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def label(self) -> str:
        return f"llama/batch={self.batch}/seq={self.seq}"


LLAMA = LlamaShape(
    hidden=768,
    heads=12,
    kv_heads=4,
    head_dim=64,
    ffn=2048,
    layers=12,
    vocab=32000,
    batch=8,
    seq=128,
)
LLAMA_SHAPES = {"8x128": LLAMA, "1x512": LlamaShape(**{**LLAMA.__dict__, "batch": 1, "seq": 512})}
TINY_LLAMA = LlamaShape(
    hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, layers=2, vocab=100, batch=2, seq=16
)


def llama_model(shape: LlamaShape) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.ffn,
        max_position_embeddings=max(2048, shape.seq),
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaModel(config).eval()


def llama_inputs(shape: LlamaShape) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)}


def llama_masks(
    structure: passes.Structure, shape: LlamaShape, kept: float, pattern: str
) -> dict[str, torch.Tensor]:
    """Masks keeping ``kept`` of each unit kind (rotary pairs per kv group, value dims per kv
    group, query heads, FFN width) of a GQA model.

    *concentrated*: the kept pairs / dims fill the first kv groups, the kept query heads are the
    first ones (so of the same groups); *spread*: every kv group keeps the same number of pairs
    and dims, and one query head or more each (at least one per group, so the share of query
    heads kept is at least 1 / group size); *unequal*: pairs, dims and query heads at random."""
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for name, size in structure.mask_shapes().items():
        mask = torch.zeros(size)
        n = max(1, round(kept * size.numel()))
        if name.endswith(".heads"):
            if pattern == "spread":
                per_group = max(1, round(n / shape.kv_heads))
                for g in range(shape.kv_heads):
                    mask[g * shape.group : g * shape.group + per_group] = 1
            elif pattern == "unequal":
                mask[torch.randperm(size[0], generator=gen)[:n]] = 1
            else:
                mask[:n] = 1
        elif len(size) == 1 or pattern == "unequal":
            mask.view(-1)[torch.randperm(size.numel(), generator=gen)[:n]] = 1
        elif pattern == "spread":
            per_group = max(1, round(kept * size[1]))
            for g in range(size[0]):
                mask[g, torch.randperm(size[1], generator=gen)[:per_group]] = 1
        else:
            mask.view(-1)[:n] = 1
        masks[name] = mask
    return masks


def llama_counts(
    masks: dict[str, torch.Tensor], shape: LlamaShape, layer: int
) -> tuple[int, int, int, int, int, int]:
    """Of one layer: kept query heads, rotary pairs and value dims (over all kv groups), the
    pairs and value dims summed over the kept query heads (what q, o and the attention pay),
    and FFN width. A group none of whose query heads is kept does no work."""
    qk, vo = masks[f"attn{layer}.qk"], masks[f"attn{layer}.vo"]
    heads = masks.get(f"attn{layer}.heads", torch.ones(shape.heads))
    per_group = heads.view(shape.kv_heads, shape.group).sum(1)
    live = per_group > 0
    pairs, dims = qk.sum(1), vo.sum(1)
    return (
        int(heads.sum()),
        int(pairs[live].sum()),
        int(dims[live].sum()),
        int((per_group * pairs).sum()),
        int((per_group * dims).sum()),
        int(masks[f"ffn{layer}"].sum()),
    )


def llama_flops(shape: LlamaShape, counts: list[tuple[int, ...]]) -> float:
    """Multiply-adds x 2 per forward for layers with these counts (embeddings excluded)."""
    tokens, d = shape.batch * shape.seq, shape.hidden
    total = 0.0
    for _, pairs, dims, head_pairs, head_dims, width in counts:
        proj = 2 * tokens * d * (2 * head_pairs + 2 * pairs + dims + head_dims + 3 * width)
        total += proj + 2 * tokens * shape.seq * (2 * head_pairs + head_dims)
    return total


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class UniformLlamaLayer(nn.Module):
    """One pre-norm Llama layer with a single kv group (``pairs`` rotary pairs, ``dims`` value
    dims) shared by ``heads`` query heads, and a SwiGLU FFN of ``width``."""

    def __init__(self, hidden: int, heads: int, pairs: int, dims: int, width: int, head_dim: int):
        super().__init__()
        self.heads, self.pairs, self.dims = heads, pairs, dims
        self.scale = 1 / math.sqrt(head_dim)
        self.q = nn.Linear(hidden, heads * 2 * pairs, bias=False)
        self.kv = nn.Linear(hidden, 2 * pairs + dims, bias=False)
        self.o = nn.Linear(heads * dims, hidden, bias=False)
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.gate_up = nn.Linear(hidden, 2 * width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, -1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        h = self.norm1(x)
        cos, sin = freqs[..., : self.pairs].cos(), freqs[..., : self.pairs].sin()
        q = self.rope(
            self.q(h).view(bsz, seq, self.heads, 2 * self.pairs).transpose(1, 2), cos, sin
        )
        k, v = self.kv(h).split([2 * self.pairs, self.dims], -1)
        k = self.rope(k.unsqueeze(1), cos, sin)
        ctx = nn.functional.scaled_dot_product_attention(
            q, k, v.unsqueeze(1), is_causal=True, scale=self.scale, enable_gqa=self.heads > 1
        )
        x = x + self.o(ctx.transpose(1, 2).reshape(bsz, seq, self.heads * self.dims))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(nn.functional.silu(gate) * up)


class UniformLlama(nn.Module):
    """The same kept work in the most regular shape: per layer one kv group with its kept query
    heads, FFN of the kept width (``counts``: one tuple per layer, as ``llama_counts``)."""

    def __init__(self, shape: LlamaShape, counts: list[tuple[int, ...]]):
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.norm = RMSNorm(shape.hidden)
        self.layers = nn.ModuleList(
            UniformLlamaLayer(shape.hidden, heads, pairs, dims, width, shape.head_dim)
            for heads, pairs, dims, _, _, width in counts
        )
        pairs = shape.head_dim // 2
        inv = 1.0 / (10000 ** (torch.arange(pairs, dtype=torch.float32) / pairs))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        for layer in self.layers:
            x = layer(x, freqs)
        return self.norm(x)


def compact_models(
    dense: nn.Module,
    masked: nn.Module,
    structure: passes.Structure,
    buckets: list[int | str],
    mode: str,
) -> dict[str, nn.Module]:
    """The models one row times, in timing order: the dense model, the rewrite at every
    bucket size and, eager only, bucket 4 without merged projections."""
    models: dict[str, nn.Module] = {"dense": dense}
    for b in buckets:
        models[f"bucket={b}"] = (
            buckets.rewrite(masked, structure)
            if b == "auto"
            else passes.rewrite(masked, structure, bucket=b)
        )
    if mode == "eager":
        models["bucket=4,unmerged"] = passes.rewrite(
            masked, structure, bucket=4, merge_projections=False
        )
    return models


def print_speedups(speedups: dict[str, float]) -> None:
    """One row's speedups, and the best bucket's share of the uniform-shape limit."""
    best = max((s for n, s in speedups.items() if n.startswith("bucket")))
    print(
        "  speedups: "
        + ", ".join(f"{n} {s:.2f}x" for n, s in speedups.items())
        + f" | best compact / uniform {best / speedups['uniform']:.0%}",
        flush=True,
    )


def run_llama(
    shape: LlamaShape,
    kept_shares: list[float],
    patterns: list[str],
    buckets: list[int | str],
    compile_buckets: list[int | str],
    threads: list[int],
    compile_threads: list[int],
    reps: int,
    out: Path,
) -> ResultStore:
    """Rows of the Llama-shaped model, under ``llama/batch=B/seq=S/threads=T/{eager,compiled}/
    ...``.

    The limit of a kept share is built from its concentrated masks (the fewest kv groups and
    query heads holding the kept units), the same for every pattern."""
    store = ResultStore(out, {"machine": machine()})
    dense = llama_model(shape)
    inputs = llama_inputs(shape)
    gm = passes.capture(dense, inputs)
    structure = passes.discover(gm)
    masked = passes.instrument(gm, structure)
    full = {n: torch.ones(s) for n, s in structure.mask_shapes().items()}
    dense_flops = llama_flops(shape, [llama_counts(full, shape, i) for i in range(shape.layers)])
    runs = [(t, "eager") for t in threads] + [(t, "compiled") for t in compile_threads]
    for n_threads, mode in runs:
        torch.set_num_threads(n_threads)
        for kept in kept_shares:
            limit_counts = [
                llama_counts(llama_masks(structure, shape, kept, "concentrated"), shape, i)
                for i in range(shape.layers)
            ]
            for pattern in patterns:
                key = f"{shape.label}/threads={n_threads}/{mode}/kept={kept}/{pattern}"
                if key in store:
                    continue
                masks = llama_masks(structure, shape, kept, pattern)
                passes.set_masks(masked, masks)
                models = compact_models(
                    dense, masked, structure, buckets if mode == "eager" else compile_buckets, mode
                )
                torch.manual_seed(0)
                models["uniform"] = UniformLlama(shape, limit_counts).eval()
                counts = [llama_counts(masks, shape, i) for i in range(shape.layers)]
                print(
                    f"{key}: density {structure.density(masks):.3f}, layer 0 keeps "
                    f"{counts[0][0]} query heads, {counts[0][1]} pairs, {counts[0][2]} value "
                    f"dims, FFN {counts[0][5]}",
                    flush=True,
                )
                medians, compile_s = measure(key, models, inputs, reps, mode == "compiled")
                speedups = {n: medians["dense"] / t for n, t in medians.items()}
                store.put(
                    key,
                    {
                        "model": "llama",
                        "shape": shape.__dict__,
                        "reps": reps,
                        "threads": n_threads,
                        "mode": mode,
                        "kept": kept,
                        "pattern": pattern,
                        "density": structure.density(masks),
                        "layer0": counts[0],
                        "seconds": medians,
                        "speedup": speedups,
                        "flops_ratio": dense_flops / llama_flops(shape, counts),
                        "uniform_speedup": speedups["uniform"],
                        "compile_seconds": compile_s if mode == "compiled" else None,
                    },
                )
                print_speedups(speedups)
    return store


def run(
    shape: Shape,
    kept_shares: list[float],
    patterns: list[str],
    buckets: list[int | str],
    compile_buckets: list[int | str],
    threads: list[int],
    compile_threads: list[int],
    reps: int,
    out: Path,
) -> ResultStore:
    store = ResultStore(out, {"machine": machine(), "shape": shape.__dict__, "reps": reps})
    dense = dense_model(shape)
    inputs = inputs_for(shape)
    gm = passes.capture(dense, inputs)
    structure = passes.discover(gm)
    masked = passes.instrument(gm, structure)
    dense_flops = flops(
        shape, shape.heads * shape.head_dim, shape.heads * shape.head_dim, shape.ffn
    )
    for n_threads in sorted(set(threads) | set(compile_threads)):
        torch.set_num_threads(n_threads)
        modes = (["eager"] if n_threads in threads else []) + (
            ["compiled"] if n_threads in compile_threads else []
        )
        for mode in modes:
            for kept in kept_shares:
                for pattern in patterns:
                    key = f"threads={n_threads}/{mode}/kept={kept}/{pattern}"
                    if key in store:
                        continue
                    masks = masks_for(structure, shape, kept, pattern)
                    passes.set_masks(masked, masks)
                    chosen = buckets if mode == "eager" else compile_buckets
                    models = compact_models(dense, masked, structure, chosen, mode)
                    nq = int(masks["attn0.qk"].sum())
                    nv = int(masks["attn0.vo"].sum())
                    width = int(masks["ffn0"].sum())
                    torch.manual_seed(0)
                    models["uniform"] = UniformModel(shape, nq, nv, width).eval()
                    print(f"{key}: density {structure.density(masks):.3f}", flush=True)
                    medians, compile_s = measure(key, models, inputs, reps, mode == "compiled")
                    speedups = {n: medians["dense"] / t for n, t in medians.items()}
                    store.put(
                        key,
                        {
                            "threads": n_threads,
                            "mode": mode,
                            "kept": kept,
                            "pattern": pattern,
                            "density": structure.density(masks),
                            "seconds": medians,
                            "speedup": speedups,
                            "flops_ratio": dense_flops / flops(shape, nq, nv, width),
                            "uniform_speedup": speedups["uniform"],
                            "compile_seconds": compile_s if mode == "compiled" else None,
                        },
                    )
                    print_speedups(speedups)
    return store


def _bucket(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for smoke tests")
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--patterns", nargs="+", default=["spread", "concentrated", "unequal"])
    parser.add_argument(
        "--buckets",
        type=_bucket,
        nargs="+",
        default=[1, 4, 8, 16, 64, "auto"],
        help="bucket sizes of the eager rows: ints, or auto (timed per block)",
    )
    parser.add_argument("--compile-buckets", type=_bucket, nargs="+", default=[4, 8, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--compile-threads",
        type=int,
        nargs="*",
        default=[1],
        help="thread counts to time torch.compile'd models at (none: skip)",
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "rewrite_speed.json")
    parser.add_argument(
        "--only",
        choices=["bert", "llama"],
        help="run only the BERT rows or only the Llama rows (default: both)",
    )
    parser.add_argument(
        "--llama-shapes",
        nargs="+",
        choices=list(LLAMA_SHAPES),
        default=list(LLAMA_SHAPES),
        help="batch x seq of the Llama rows",
    )
    args = parser.parse_args(argv)
    if args.only != "llama":
        shape = TINY if args.quick else BERT_BASE
        run(
            shape,
            args.kept,
            args.patterns,
            args.buckets,
            args.compile_buckets,
            args.threads,
            args.compile_threads,
            args.reps,
            args.out,
        )
    if args.only != "bert":
        shapes = [TINY_LLAMA] if args.quick else [LLAMA_SHAPES[s] for s in args.llama_shapes]
        for shape in shapes:
            run_llama(
                shape,
                args.kept,
                args.patterns,
                args.buckets,
                args.compile_buckets,
                args.threads,
                args.compile_threads,
                args.reps,
                args.out,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
