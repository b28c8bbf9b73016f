"""Latency of the compact models against their dense model, eager and torch.compile.

Two families:

* every compact model the accuracy benchmarks saved (``benchmarks/results/models/<task>-*.pt2``,
  timed against ``<task>-dense.pt2``, the teacher captured by the same pass);
* a 12-layer BERT-base-size model (random weights) pruned to the kept structure GRAIN found on
  Rotten Tomatoes at each density (``accuracy_rt.json``: per layer the query and value units of
  each head and the FFN width, scaled from MiniLM's 6 layers x 12 heads of 32 to 12 layers x 12
  heads of 64), beside the uniform-shape limit of ``benchmarks/rewrite_speed.py`` (the same
  kept work as one head and one FFN per layer).

At (batch 1, seq 128), (batch 8, seq 128) and (batch 32, seq 64), interleaved runs, medians,
with the FLOPs ratio as the ideal speedup. Each measured row is written at once to
``benchmarks/results/speed.json``; a rerun skips what is there.

    python benchmarks/speed.py                     # 1 thread, eager and compiled
    python benchmarks/speed.py --no-compile --quick --models DIR   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grainfx  # noqa: E402
import passes  # noqa: E402
from benchmarks.common import RESULTS, ResultStore, machine  # noqa: E402
from benchmarks.rewrite_speed import BERT_BASE, TINY, Shape, UniformModel, dense_model  # noqa: E402
from grainfx import buckets  # noqa: E402
from grainfx.timing import example_inputs, interleaved_medians  # noqa: E402

SHAPES = ((1, 128), (8, 128), (32, 64))


def saved_models(folder: Path, run_glob: str) -> list[tuple[str, Path, Path]]:
    """(name, file, dense file) for every seed-0 ``<task>-<run_glob>`` beside a
    ``<task>-dense.pt2`` (other seeds' models share seed 0's speed closely and are skipped):
    ``*.pt2`` for grainfx's compact models, ``tp-*.pt`` for the torch-pruning students saved
    whole by ``benchmarks/peer_torch_pruning.py``."""
    found = []
    for dense in sorted(folder.glob("*-dense.pt2")):
        task = dense.name[: -len("-dense.pt2")]
        for path in sorted(folder.glob(f"{task}-{run_glob}")):
            if path != dense and not re.search(r"-s\d+$", path.stem):
                found.append((path.stem, path, dense))
    return found


def as_compact(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` through discover, instrument and rewrite with every unit kept: the same
    computation, run by the same pass as grainfx's compact models, with their record."""
    structure = passes.discover(gm)
    masked = passes.instrument(gm, structure)
    passes.set_masks(masked, structure.ones())
    return buckets.rewrite(masked, structure)


def time_peers(
    store: ResultStore, folder: Path, peer: Path, modes: list[str], reps: int, only: str | None
) -> None:
    """Time each torch-pruning student, captured and rewritten (all kept) by grainfx's passes,
    against its dense model, recording the density its benchmark (``peer``) measured."""
    records = json.loads(peer.read_text())["records"] if peer.exists() else {}
    for name, path, dense_path in saved_models(folder, "tp-*.pt"):
        run = name.split("-", 1)[1]
        if (only and not re.search(only, name)) or run not in records:
            continue
        dense = grainfx.load(dense_path)
        make = functools.partial(example_inputs, dense.grainfx_inputs)
        module = torch.load(path, weights_only=False).eval()
        compact = as_compact(passes.capture(module, make(2, 16)))
        models = {"dense": dense, "compact": compact}
        extra = {"family": name.split("-")[0], "density": records[run]["density"]}
        measure(store, name, models, make, modes, reps, extra, reference=as_compact(dense))


def grain_shaped_masks(
    structure: passes.Structure, layers: list[dict], shape: Shape
) -> dict[str, torch.Tensor]:
    """Masks giving each layer of ``structure`` the kept structure of ``layers`` (a report's
    per-layer heads, query / value units and FFN width from a smaller model), scaled."""
    masks = {name: torch.zeros(size) for name, size in structure.mask_shapes().items()}
    blocks, ffns = structure.attention, structure.ffn
    for i in range(len(blocks)):
        src = layers[i * len(layers) // len(blocks)]
        scale = shape.head_dim / (src.get("head_dim") or 32)  # older records: MiniLM's
        heads = zip(
            range(blocks[i].num_heads), src["query_units"], src["value_units"], strict=False
        )
        for h, q, v in heads:
            masks[f"{blocks[i].name}.qk"][h, : min(shape.head_dim, round(q * scale))] = 1
            masks[f"{blocks[i].name}.vo"][h, : min(shape.head_dim, round(v * scale))] = 1
    for i in range(len(ffns)):
        src = layers[i * len(layers) // len(ffns)]
        width = round(src["ffn"] * shape.ffn / (src.get("ffn_dense") or 1536))
        masks[ffns[i].name][:width] = 1
    return masks


def measure(
    store: ResultStore,
    name: str,
    models: dict,
    make_inputs: Callable[[int, int], dict],
    modes: list[str],
    reps: int,
    extra: dict,
    reference: torch.nn.Module | None = None,
) -> None:
    """Time ``models`` (``dense``, ``compact``, maybe ``limit``) at every shape and mode.

    Compiled models are compiled once with dynamic shapes and reused for every shape; the
    first call's time is recorded as the compile time. The ideal speedup is the dense FLOPs
    the compact model records, or ``reference``'s FLOPs (a compact model of another library,
    whose own record knows nothing of the dense one) over the compact model's."""
    compiled = (
        {k: torch.compile(m, dynamic=True) for k, m in models.items()}
        if "compiled" in modes
        else {}
    )
    first: dict[str, float] = {}
    for batch, seq in SHAPES:
        inputs = make_inputs(batch, seq)
        inspection = grainfx.inspect(models["compact"], seq=seq)
        for mode in modes:
            key = f"{name}/{mode}/b={batch},s={seq}"
            if key in store:
                continue
            fns = compiled if mode == "compiled" else models
            for k, fn in fns.items():
                if mode == "compiled" and k not in first:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        fn(**inputs)
                    first[k] = time.perf_counter() - start
            calls = {k: functools.partial(f, **inputs) for k, f in fns.items()}
            seconds = interleaved_medians(calls, reps)
            speedup = {k: seconds["dense"] / v for k, v in seconds.items()}
            dense_flops = (
                grainfx.inspect(reference, seq=seq).flops
                if reference is not None
                else inspection.flops_dense
            )
            ideal = dense_flops / inspection.flops
            store.put(
                key,
                {
                    "model": name,
                    "mode": mode,
                    "batch": batch,
                    "seq": seq,
                    "density": inspection.density,
                    "seconds": seconds,
                    "speedup": speedup,
                    "flops_ratio": ideal,
                    "compile_seconds": dict(first) if mode == "compiled" else None,
                    **extra,
                },
            )
            print(
                f"{key}: "
                + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items())
                + f" (FLOPs ratio {ideal:.1f}x)",
                flush=True,
            )


def token_inputs(shape: Shape, batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, shape.vocab, (batch, seq), generator=gen),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def bert_base_runs(
    store: ResultStore, accuracy: Path, shape: Shape, modes: list[str], reps: int, only: str | None
) -> None:
    if not accuracy.exists():
        print(f"{accuracy} missing: no GRAIN structures for the BERT-base-size rows")
        return
    records = json.loads(accuracy.read_text())["records"]
    dense = dense_model(shape)
    captured = passes.capture(dense, token_inputs(shape, 2, 16))
    structure = passes.discover(captured)
    masked = passes.instrument(captured, structure)
    for run, record in records.items():
        if not run.startswith("grain-") or (only and not re.search(only, f"bert-base-{run}")):
            continue
        masks = grain_shaped_masks(structure, record["layers"], shape)
        passes.set_masks(masked, masks)
        compact = buckets.rewrite(masked, structure)
        per_layer = [
            [int(masks[f"{b.name}.{kind}"].sum()) for b in structure.attention]
            for kind in ("qk", "vo")
        ]
        widths = [int(masks[f.name].sum()) for f in structure.ffn]
        torch.manual_seed(0)
        limit = UniformModel(shape, per_layer[0], per_layer[1], widths).eval()
        models = {"dense": captured, "compact": compact, "limit": limit}
        measure(
            store,
            f"bert-base-{run}",
            models,
            functools.partial(token_inputs, shape),
            modes,
            reps,
            {"family": "bert-base", "structure_from": run},
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--models", type=Path, default=RESULTS / "models")
    parser.add_argument(
        "--accuracy",
        type=Path,
        default=RESULTS / "accuracy_rt.json",
        help="the GRAIN structures for the BERT-base-size rows",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny BERT instead of the BERT-base-size one (smoke test)",
    )
    parser.add_argument(
        "--peer",
        type=Path,
        default=RESULTS / "peer_torch_pruning.json",
        help="the torch-pruning runs, for the densities of their saved students",
    )
    parser.add_argument("--only", help="time only the models whose name matches this regex")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    store = ResultStore(
        args.out,
        {"machine": machine(), "threads": args.threads, "reps": args.reps, "shapes": SHAPES},
    )
    began = time.perf_counter()
    bert_base_runs(
        store, args.accuracy, TINY if args.quick else BERT_BASE, modes, args.reps, args.only
    )
    dense: dict[Path, torch.nn.Module] = {}
    for name, compact_path, dense_path in saved_models(args.models, "*.pt2"):
        if args.only and not re.search(args.only, name):
            continue
        compact = grainfx.load(compact_path)
        if dense_path not in dense:
            dense[dense_path] = grainfx.load(dense_path)
        models = {"dense": dense[dense_path], "compact": compact}
        make = functools.partial(example_inputs, compact.grainfx_inputs)
        measure(store, name, models, make, modes, args.reps, {"family": name.split("-")[0]})
    time_peers(store, args.models, args.peer, modes, args.reps, args.only)
    store.meta["minutes"] = store.meta.get("minutes", 0) + (time.perf_counter() - began) / 60
    store.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
