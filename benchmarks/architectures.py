"""Architectures beyond the exactness table: does the manual path (capture, discover,
instrument, random masks, rewrite) give an exact compact model on a tiny random-init config?

Each model is checked under five mask kinds (random, heads without query units, empty
attention, empty FFN, one query unit left) at two input shapes: relative error <= 1e-4 against
the masked graph and parameter count == ``Structure.count_params``. A model that discover
refuses is recorded with its one-line error. Results: ``results/architectures.json``; the README
table is generated from it (``readme_tables.py``).

    python benchmarks/architectures.py [--only opt bloom]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import transformers as T

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import passes  # noqa: E402
from benchmarks.common import RESULTS, ResultStore, machine  # noqa: E402
from grainfx import buckets  # noqa: E402

KINDS = ("random", "value_only", "empty_attention", "empty_ffn", "one_unit_left")
_COMMON = dict(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _text(**extra) -> dict:
    return {**_COMMON, **extra}


#: name -> (config factory, model class). Every one is a text model called on token ids.
MODELS: dict[str, tuple[Callable[[], object], type]] = {
    "OPT": (
        lambda: T.OPTConfig(**{**_text(), "ffn_dim": 96, "word_embed_proj_dim": 64}),
        T.OPTForCausalLM,
    ),
    "GPT-Neo": (
        lambda: T.GPTNeoConfig(
            vocab_size=100,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            window_size=4,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]],
        ),
        T.GPTNeoForCausalLM,
    ),
    "StableLM": (lambda: T.StableLmConfig(**_text(num_key_value_heads=2)), T.StableLmForCausalLM),
    "OLMo": (lambda: T.OlmoConfig(**_text()), T.OlmoForCausalLM),
    "Gemma": (
        lambda: T.GemmaConfig(**_text(num_key_value_heads=1, head_dim=16)),
        T.GemmaForCausalLM,
    ),
    "Gemma 3": (
        lambda: T.Gemma3TextConfig(**_text(num_key_value_heads=2, head_dim=16, sliding_window=4)),
        T.Gemma3ForCausalLM,
    ),
    "Starcoder2": (
        lambda: T.Starcoder2Config(**_text(num_key_value_heads=2)),
        T.Starcoder2ForCausalLM,
    ),
    "CodeGen": (
        lambda: T.CodeGenConfig(
            vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64
        ),
        T.CodeGenForCausalLM,
    ),
    "XLM-RoBERTa": (lambda: T.XLMRobertaConfig(**_text()), T.XLMRobertaForSequenceClassification),
    "Phi": (lambda: T.PhiConfig(**_text(partial_rotary_factor=0.5)), T.PhiForCausalLM),
    "SmolLM3": (lambda: T.SmolLM3Config(**_text(num_key_value_heads=2)), T.SmolLM3ForCausalLM),
    "OLMo 2": (lambda: T.Olmo2Config(**_text()), T.Olmo2ForCausalLM),
    "ALBERT": (
        lambda: T.AlbertConfig(**_text(embedding_size=64)),
        T.AlbertForSequenceClassification,
    ),
    "DeBERTa-v2": (
        lambda: T.DebertaV2Config(
            **_text(relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8)
        ),
        T.DebertaV2ForSequenceClassification,
    ),
    "BLOOM": (
        lambda: T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4),
        T.BloomForCausalLM,
    ),
}


def _inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _masks(structure: passes.Structure, kind: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {
        n: (torch.rand(s, generator=gen) < 0.5).float() for n, s in structure.mask_shapes().items()
    }
    for block in structure.attention:
        names = block.mask_names()
        if kind == "value_only" and "qk" in names:
            masks[names["qk"]][0] = 0
        elif kind == "empty_attention":
            masks[names["vo"]].zero_()
        elif kind == "one_unit_left" and "qk" in names:
            masks[names["qk"]].zero_()
            masks[names["qk"]][:, 0] = 1
    if kind == "empty_ffn":
        for block in structure.ffn:
            masks[block.name].zero_()
    return masks


def check(name: str, impl: str) -> dict:
    """The record of one model and attention implementation."""
    make, cls = MODELS[name]
    config = make()
    config._attn_implementation = impl
    config.initializer_range = 0.3
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = cls(config).eval()
    except (ValueError, NotImplementedError) as exc:  # no such implementation
        return {"status": "n/a", "message": str(exc).splitlines()[0][:160]}
    shapes = (_inputs(2, 8, 0), _inputs(3, 13, 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = passes.capture(model, shapes[0])
            structure = passes.discover(gm)
    except passes.DiscoverError as exc:
        return {
            "status": "refused",
            "message": str(exc).splitlines()[0],
            "error": type(exc).__name__,
        }
    masked = passes.instrument(gm, structure)
    worst, params_ok = 0.0, True
    for seed, kind in enumerate(KINDS):
        masks = _masks(structure, kind, seed)
        passes.set_masks(masked, masks)
        compact = buckets.rewrite(masked, structure)
        params_ok &= sum(p.numel() for p in compact.parameters()) == structure.count_params(masks)
        for x in shapes:
            with torch.no_grad():
                expected, actual = masked(**x), compact(**x)
            for key in expected:
                scale = expected[key].abs().max().clamp_min(1e-6)
                worst = max(worst, ((expected[key] - actual[key]).abs().max() / scale).item())
    exact = worst <= 1e-4 and params_ok
    return {
        "status": "exact" if exact else "wrong",
        "max_relative_error": worst,
        "parameter_count_matches": params_ok,
        "attention_blocks": len(structure.attention),
        "ffn_blocks": len(structure.ffn),
        "prunable_share": structure.unit_params / structure.total_params,
        "uncovered": list(structure.uncovered),
        "seconds": time.perf_counter() - start,
    }


def section(data: dict) -> str:
    """The README table: one row per model, eager and sdpa side by side."""
    records = data["records"]
    lines = [
        "Beyond the exactness table (`python benchmarks/architectures.py`: tiny random-init "
        "configs, 5 mask kinds x 2 input shapes, relative error <= 1e-4 and parameter "
        f"count == prediction; transformers {data['meta'].get('transformers', '?')}):",
        "",
        "| model | eager | sdpa | blocks (attention / FFN) | prunable share | note |",
        "|---|---|---|---:|---:|---|",
    ]
    for name in sorted({k.rsplit("/", 1)[0] for k in records}):
        cells, note, blocks, share = [], "", "", ""
        for impl in ("eager", "sdpa"):
            r = records.get(f"{name}/{impl}", {"status": "-"})
            cells.append(r["status"])
            if r["status"] == "exact":
                blocks = f"{r['attention_blocks']} / {r['ffn_blocks']}"
                share = f"{r['prunable_share']:.0%}"
            elif r["status"] in ("refused", "wrong") and not note:
                note = r.get("message", "").replace("|", "/")[:240]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {blocks} | {share} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), metavar="MODEL")
    parser.add_argument("--out", type=Path, default=RESULTS / "architectures.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = ResultStore(args.out, {"machine": machine(), "transformers": T.__version__})
    for name in args.only or MODELS:
        for impl in ("eager", "sdpa"):
            key = f"{name}/{impl}"
            if key in store:
                continue
            record = check(name, impl)
            store.put(key, record)
            print(f"{key}: {record['status']} {record.get('message', '')}"[:200], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
