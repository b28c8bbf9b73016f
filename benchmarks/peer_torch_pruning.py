"""A peer library side by side: torch-pruning on the Rotten Tomatoes teacher of accuracy_rt.py.

The same teacher, data and distillation budget as ``benchmarks/accuracy_rt.py``, pruned by
torch-pruning (``MetaPruner`` with ``GroupTaylorImportance``, whole attention heads via
``num_heads`` / ``prune_num_heads=True`` as in its Hugging Face BERT example, and FFN neurons;
embeddings, LayerNorms, pooler and classifier ignored) to the encoder size GRAIN reached (its
``encoder_parameters`` "after" in ``accuracy_rt.json`` when that run is there, else the target
density times the dense count). torch-pruning takes a head ratio and a channel ratio, not a
parameter budget, so the ratios are solved for the budget: heads cut by the budget's share, the
same count in every layer and at least one (it cannot empty a layer, so its global head ranking
breaks at these densities: see ``prune``); FFN neurons, ranked globally, take the rest. Taylor
scores come from the teacher's own loss on a few RT batches before each of the iterative
pruning steps. Then the student is distilled like GRAIN's: 2 epochs of batches of 32 grouped
by length, AdamW (lr 1e-4, 10% warm-up then linear decay, clip 1), logit KD at
temperature 8 plus the hidden-state MSE through ``HiddenMaps`` on every 2nd layer output
(embeddings included).

Encoder parameters are counted in grainfx's units (``passes.structure``): Q and K rows with
biases, V rows with bias and O columns, FFN up rows with bias and down columns.

Each run (``tp-10``, ``tp-5``) is written at once to ``benchmarks/results/peer_torch_pruning.json``
(rerunning skips finished runs), with accuracy, retention, parameters, heads and FFN width per
layer, latency against the dense teacher at batch 32, and a ``capabilities`` record: what
saving and reloading works and what torch-pruning cannot express. The pruned modules go to
``benchmarks/results/models/rt-tp-<n>.pt`` (``torch.save`` of the whole module).

    python benchmarks/peer_torch_pruning.py --threads 1     # both runs (~8 min a run here)
    python benchmarks/peer_torch_pruning.py --only tp-5
    python benchmarks/peer_torch_pruning.py --quick         # tiny model, tiny data: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.accuracy_rt import rt_setup, scored
from benchmarks.common import RESULTS, ResultStore, machine, seed_key
from benchmarks.peer_torch_pruning_lm import (
    TP_VERSION,
    head_pruner,
    prune_ffn_globally,
    taylor_gradients,
)
from grainfx import demo
from grainfx.data import accuracy, text_batches
from grainfx.distill import HiddenMaps, kd_loss
from grainfx.schedule import lr_factor
from grainfx.timing import interleaved_medians


@dataclass(frozen=True)
class Run:
    """One student: its name and target encoder density (``quick_density`` on the tiny model,
    where one head per layer is already 12.5% of the encoder)."""

    name: str
    density: float
    quick_density: float


RUNS = (Run("tp-10", 0.10, 0.35), Run("tp-5", 0.05, 0.25))
TEMPERATURE = 8.0
HIDDEN_EVERY = 2


# ---- the encoder in grainfx's units -------------------------------------------------------


def layer_widths(model) -> list[dict]:
    """Per encoder layer: attention heads, their size and the FFN width."""
    rows = []
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        rows.append(
            {
                "heads": attn.query.out_features // attn.attention_head_size,
                "head_size": attn.attention_head_size,
                "ffn": layer.intermediate.dense.out_features,
            }
        )
    return rows


def encoder_parameters(model) -> int:
    """Prunable encoder parameters as grainfx counts them (its query, value and FFN units)."""
    total = 0
    for layer in model.bert.encoder.layer:
        attn, out = layer.attention.self, layer.attention.output.dense
        up, down = layer.intermediate.dense, layer.output.dense
        total += attn.query.out_features * 2 * (attn.query.in_features + 1)
        total += attn.value.out_features * (attn.value.in_features + 1 + out.out_features)
        total += up.out_features * (up.in_features + 1 + down.out_features)
    return total


def unit_sizes(model) -> tuple[int, int, int, int]:
    """(parameters of one head, of one FFN neuron, heads, FFN neurons) of the dense model."""
    layer = model.bert.encoder.layer[0]
    attn, hidden = layer.attention.self, model.config.hidden_size
    head = attn.attention_head_size * (2 * (hidden + 1) + (hidden + 1) + hidden)
    widths = layer_widths(model)
    return (head, 2 * hidden + 1, sum(w["heads"] for w in widths), sum(w["ffn"] for w in widths))


def plan(model, target: int) -> dict:
    """Heads per layer and FFN neurons to keep for ``target`` encoder parameters.

    Heads are cut by the share the target keeps, rounded to the same count in every layer and
    at least one (torch-pruning cannot empty a layer, see ``prune``); FFN neurons take the
    rest of the budget. Ratios aim half a unit above the count because torch-pruning keeps
    ``int(total * (1 - ratio))`` (and removes ``ceil(ratio * heads)`` heads per layer).
    """
    head, neuron, heads, neurons = unit_sizes(model)
    layers = model.config.num_hidden_layers
    per_layer = heads // layers
    share = target / encoder_parameters(model)
    keep = min(per_layer, max(1, round(per_layer * share)))
    while keep > 1 and keep * layers * head > target:
        keep -= 1
    keep_neurons = min(neurons, max(layers, round((target - keep * layers * head) / neuron)))
    return {
        "heads_per_layer": keep,
        "heads": keep * layers,
        "ffn": keep_neurons,
        "head_ratio": (per_layer - keep - 0.5) / per_layer,
        "ffn_ratio": 1 - (keep_neurons + 0.5) / neurons,
        "encoder_parameters": keep * layers * head + keep_neurons * neuron,
    }


def grain_target(path: Path, run: Run) -> int | None:
    """GRAIN's encoder parameters after pruning at the same density, if that run is done."""
    if not path.exists():
        return None
    record = (
        json.loads(path.read_text()).get("records", {}).get(f"grain-{round(run.density * 100)}")
    )
    return record["encoder_parameters"][1] if record else None


# ---- torch-pruning ------------------------------------------------------------------------


def prune(model, example: dict, batches, plan_: dict, steps: int, grad_batches: int) -> list:
    """Prune ``model`` in place with torch-pruning; returns the heads per layer.

    Heads: one shot, the same count in every layer (``global_pruning=False``, as in
    torch-pruning's BERT example). Global head ranking cannot be used at these densities:
    when it picks every head of a layer, torch-pruning skips that layer's group (it never
    empties a layer) but still books its heads as removed, and its iterative per-layer
    schedule takes ``ceil(ratio * heads left)`` per step, which also empties layers. FFN
    neurons: ranked globally across layers, in ``steps`` iterative steps. Every step uses
    fresh Taylor gradients of the teacher's loss.
    """
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    ffn = [layer.intermediate.dense for layer in model.bert.encoder.layer]
    outside = [model.bert.embeddings, model.classifier]
    outside += [model.bert.pooler] if model.bert.pooler is not None else []
    outside += [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    taylor = tp.importance.GroupTaylorImportance()
    batches = cycle(batches, (steps + 1) * grad_batches)

    def show(what: str) -> None:
        widths = layer_widths(model)
        print(
            f"  {what}: heads {[w['heads'] for w in widths]}, FFN {[w['ffn'] for w in widths]}",
            flush=True,
        )

    num_heads = {
        proj: a.num_attention_heads for a in attentions for proj in (a.query, a.key, a.value)
    }
    taylor_gradients(model, batches, grad_batches)
    heads = head_pruner(model, example, taylor, num_heads, plan_["head_ratio"], outside + ffn)
    for group in heads.step(interactive=True):
        group.prune()
    for a in attentions:  # the HF module keeps its own head count
        a.num_attention_heads = heads.num_heads[a.query]
        a.all_head_size = a.query.out_features
    show("heads pruned")
    prune_ffn_globally(
        model,
        example,
        taylor,
        plan_["ffn_ratio"],
        steps,
        outside + [p for a in attentions for p in (a.query, a.key, a.value)],
        lambda: taylor_gradients(model, batches, grad_batches),
        show,
    )
    model.zero_grad(set_to_none=True)
    return [a.num_attention_heads for a in attentions]


# ---- distillation as grainfx does it ------------------------------------------------------


def cycle(batches, total: int):
    count = 0
    while count < total:
        for batch in batches:
            yield batch
            count += 1
            if count == total:
                return


def distil(
    student, teacher, batches, steps: int, learning_rate: float, seed: int, progress: bool = True
) -> dict:
    """GRAIN's distillation without its pruning: logit KD plus hidden-state MSE."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    hidden = student.config.hidden_size
    maps = HiddenMaps(
        len(range(0, student.config.num_hidden_layers + 1, HIDDEN_EVERY)), hidden, hidden
    )
    params = [p for p in student.parameters() if p.requires_grad] + list(maps.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=learning_rate,
        eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 0.1))
    student.train()
    teacher.eval()
    kd_last = hidden_last = float("nan")
    with tqdm(total=steps, desc="distil", unit="step", disable=not progress, mininterval=20) as bar:
        for batch in cycle(batches, steps):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask = inputs.get("attention_mask")
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=True)
            s_out = student(**inputs, output_hidden_states=True)
            kd = kd_loss(s_out.logits, t_out.logits, TEMPERATURE, mask)
            hid = maps(
                list(s_out.hidden_states[::HIDDEN_EVERY]),
                list(t_out.hidden_states[::HIDDEN_EVERY]),
                mask,
            )
            (kd + hid).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            kd_last, hidden_last = kd.item(), hid.item()
            bar.set_postfix(kd=f"{kd_last:.4f}", hidden=f"{hidden_last:.4f}", refresh=False)
            bar.update(1)
    student.eval()
    return {"kd_loss": kd_last, "hidden_loss": hidden_last}


# ---- what torch-pruning can and cannot do -------------------------------------------------

_RELOAD = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModelForSequenceClassification
folder = sys.argv[1]
batch = torch.load(folder + "/batch.pt")
expected = torch.load(folder + "/logits.pt")
def check(load):
    try:
        model = load().eval()
        with torch.inference_mode():
            logits = model(**batch).logits
        same = logits.shape == expected.shape and torch.allclose(logits, expected, atol=1e-4)
        return {"works": bool(same), "detail": "same logits" if same else "other logits"}
    except Exception as exc:
        return {"works": False, "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
def tp_state_dict():
    import torch_pruning as tp
    model = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(folder + "/dense-config"))
    return tp.load_state_dict(model, tp.load(folder + "/tp_state.pt", weights_only=False))
print(json.dumps({
    "torch_save_module": check(lambda: torch.load(folder + "/module.pt", weights_only=False)),
    "torch_save_module_without_hf_hooks": check(
        lambda: torch.load(folder + "/module_nohooks.pt", weights_only=False)),
    "save_pretrained": check(
        lambda: AutoModelForSequenceClassification.from_pretrained(folder + "/pretrained")),
    "tp_state_dict": check(tp_state_dict),
}))
"""


def without_capture_hooks(model):
    """A copy of a transformers model without the output-capturing forward hooks it installs
    on its first call (local functions, which ``torch.save`` of the module cannot pickle)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if "output_capturing_hook" in getattr(hook, "__qualname__", ""):
                del module._forward_hooks[key]
        if "_output_capturing_hooks_installed" in module.__dict__:
            del module.__dict__["_output_capturing_hooks_installed"]
    return model


def saving(student, batch: dict) -> dict:
    """Which ways of saving the pruned model load in a fresh process (no pruning code)."""
    import torch_pruning as tp

    savers = {
        "torch_save_module": lambda f: torch.save(student, f / "module.pt"),
        "torch_save_module_without_hf_hooks": lambda f: torch.save(
            without_capture_hooks(student), f / "module_nohooks.pt"
        ),
        "save_pretrained": lambda f: student.save_pretrained(f / "pretrained"),
        "tp_state_dict": lambda f: (
            student.config.save_pretrained(f / "dense-config"),
            tp.save(tp.state_dict(without_capture_hooks(student)), f / "tp_state.pt"),
        ),
    }
    notes = {
        "torch_save_module": "torch.save of the whole module, torch.load(weights_only=False)",
        "torch_save_module_without_hf_hooks": (
            "the same after removing the output-capturing hooks transformers installs on the "
            "first call (the pickled transformers classes carry the patched head counts)"
        ),
        "save_pretrained": "save_pretrained + from_pretrained: the config still has the dense "
        "num_attention_heads / intermediate_size",
        "tp_state_dict": "tp.state_dict (of the model without the hooks) + tp.load_state_dict into "
        "a dense model built from the original config (needs the original "
        "architecture and config)",
    }
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        student.eval()
        with torch.inference_mode():
            torch.save(student(**batch).logits, folder / "logits.pt")
        torch.save(batch, folder / "batch.pt")
        for name, save in savers.items():
            try:
                save(folder)
            except Exception as exc:  # noqa: BLE001 - what fails is the finding
                result[name] = {
                    "works": False,
                    "detail": f"save failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300]}",
                }
        done = subprocess.run(
            [sys.executable, "-c", _RELOAD, str(folder)],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if done.returncode != 0:
            return {"error": done.stderr[-500:]}
        loaded = json.loads(done.stdout.strip().splitlines()[-1])
    result = {**loaded, **result}
    return {k: {**result[k], "how": notes[k]} for k in savers}


def capabilities(student, batch: dict) -> dict:
    """What torch-pruning could and could not do here, as data."""
    widths = layer_widths(student)
    return {
        "saving": saving(student, batch),
        "unequal_head_sizes": {
            "possible": False,
            "detail": "heads go whole (prune_num_heads) or every head loses the same dims "
            "(prune_head_dims averages importance over heads); head sizes here: "
            f"{sorted({w['head_size'] for w in widths})}",
        },
        "separate_query_and_value_units": {
            "possible": False,
            "detail": "Q, K and V of a head are one dependency group: query/key and value "
            "dims cannot be kept in different numbers",
        },
        "parameter_budget": {
            "possible": False,
            "detail": "it takes a head ratio and a channel ratio; the ratios were solved here "
            "for the encoder parameter target",
        },
        "hf_attributes_patched_by_hand": {
            "needed": True,
            "detail": "num_attention_heads / all_head_size of BertSelfAttention and the "
            "config (still dense) are not updated by torch-pruning",
        },
        "pruning_during_distillation": {
            "possible": False,
            "detail": "it prunes (iteratively) before training; distillation is this script's "
            "own loop",
        },
        "layers_without_heads": {
            "possible": False,
            "detail": "a group that would remove every head (or FFN neuron) of a layer is "
            "refused (DependencyGraph.check_pruning_group) and that layer is left "
            "unpruned, while the pruner still books its heads as removed; so at "
            "least one head per layer, and no global head ranking at 5-10% "
            f"(heads per layer here: {[w['heads'] for w in widths]})",
        },
    }


# ---- the benchmark ------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[r.name for r in RUNS])
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds of every run (data order, init)"
    )
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--prune-steps", type=int, default=5, help="iterative pruning steps")
    parser.add_argument(
        "--grad-batches",
        type=int,
        default=4,
        help="batches of Taylor gradients before each pruning step",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for training")
    parser.add_argument("--reps", type=int, default=10, help="latency repetitions")
    parser.add_argument("--quick", action="store_true", help="tiny model and data, 4 steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "peer_torch_pruning.json")
    parser.add_argument(
        "--grain",
        type=Path,
        default=RESULTS / "accuracy_rt.json",
        help="GRAIN results whose encoder sizes are the targets",
    )
    parser.add_argument(
        "--models", type=Path, default=RESULTS / "models", help="where the pruned modules go"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    teacher, tokenizer, train, test = rt_setup(args.quick)
    teacher.eval()
    held_out = text_batches(test, tokenizer, 64, shuffle=False)
    timing_batch = next(iter(text_batches(test, tokenizer, 32, shuffle=False)))
    timing_batch.pop("labels")
    store = ResultStore(
        args.out,
        {
            "machine": machine(),
            "threads": args.threads,
            "timing_threads": 2,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "prune_steps": args.prune_steps,
            "grad_batches": args.grad_batches,
            "torch_pruning": TP_VERSION,
            "train_rows": len(train),
            "held_out_rows": len(test),
            "loss": f"kd_loss(T={TEMPERATURE}) + HiddenMaps MSE on hidden_states[::{HIDDEN_EVERY}]",
            "model": "tiny random BERT (smoke test)" if args.quick else "all-MiniLM-L6-v2",
        },
    )
    dense_encoder = encoder_parameters(teacher)
    teacher_acc = accuracy(teacher, held_out)
    # scored every time: a teacher fine-tuned again must not lend its accuracy to the old runs
    if store.records.get("teacher", {}).get("accuracy") != teacher_acc:
        store.put(
            "teacher",
            {
                "accuracy": teacher_acc,
                "total_parameters": sum(p.numel() for p in teacher.parameters()),
                "encoder_parameters": dense_encoder,
                "layers": layer_widths(teacher),
            },
        )
    print(f"teacher held-out accuracy {teacher_acc:.2%}, encoder {dense_encoder:,} parameters")
    todo = [(r, s) for s in args.seeds for r in RUNS if not args.only or r.name in args.only]
    for i, (run, seed) in enumerate(todo, 1):
        key = seed_key(run.name, seed)
        if key in store and "correct" in store.records[key]:
            print(f"[{i}/{len(todo)}] {key}: done before, skipped")
            continue
        began = time.perf_counter()
        train_batches = text_batches(
            train, tokenizer, 32, shuffle=True, group_by_length=True, seed=seed
        )
        grain = None if args.quick else grain_target(args.grain, run)
        density = run.quick_density if args.quick else run.density
        target = grain if grain is not None else round(density * dense_encoder)
        plan_ = plan(teacher, target)
        print(
            f"[{i}/{len(todo)}] {key}: target {target:,} encoder parameters "
            f"({'GRAIN' if grain is not None else 'density'}): keep {plan_['heads']} heads, "
            f"{plan_['ffn']} FFN neurons ({plan_['encoder_parameters']:,})",
            flush=True,
        )
        student = copy.deepcopy(teacher)
        torch.manual_seed(demo.SEED + seed)
        heads = prune(
            student,
            dict(timing_batch),
            train_batches,
            plan_,
            2 if args.quick else args.prune_steps,
            2 if args.quick else args.grad_batches,
        )
        widths = layer_widths(student)
        if (sum(w["heads"] for w in widths), sum(w["ffn"] for w in widths)) != (
            plan_["heads"],
            plan_["ffn"],
        ):
            print(f"  warning: torch-pruning kept {widths}, not the plan {plan_}", flush=True)
        student.eval()
        with torch.inference_mode():
            shape = tuple(student(**timing_batch).logits.shape)
        pruned_acc = accuracy(student, held_out)
        print(
            f"  pruned: accuracy {pruned_acc:.2%} before distillation, logits {shape}", flush=True
        )
        steps = 4 if args.quick else max(1, int(args.epochs * len(train_batches)))
        losses = distil(
            student, teacher, train_batches, steps, args.learning_rate, demo.SEED + seed
        )
        acc, correct = scored(student, held_out)
        torch.set_num_threads(2)
        times = interleaved_medians(
            {
                "dense": lambda: teacher(**timing_batch),
                "pruned": lambda s=student: s(**timing_batch),
            },
            args.reps,
        )
        torch.set_num_threads(args.threads)
        if "capabilities" not in store:
            store.put("capabilities", capabilities(student, dict(timing_batch)))
        args.models.mkdir(parents=True, exist_ok=True)
        torch.save(without_capture_hooks(student), args.models / f"rt-{key}.pt")
        widths = layer_widths(student)
        encoder = encoder_parameters(student)
        store.put(
            key,
            {
                "library": f"torch-pruning {TP_VERSION}",
                "seed": seed,
                "correct": correct,
                "target_density": density,
                "target_encoder_parameters": target,
                "target_from": "grain" if grain else "density",
                "density": encoder / dense_encoder,
                "accuracy": acc,
                "retention": acc / teacher_acc,
                "accuracy_after_pruning": pruned_acc,
                "encoder_parameters": [dense_encoder, encoder],
                "total_parameters": [
                    store.records["teacher"]["total_parameters"],
                    sum(p.numel() for p in student.parameters()),
                ],
                "plan": plan_,
                "heads_left": sum(heads),
                "heads": [w["heads"] for w in widths],
                "ffn": [w["ffn"] for w in widths],
                "head_size": widths[0]["head_size"],
                "logits_shape": list(shape),
                "steps": steps,
                "final_losses": losses,
                "latency_ms_batch32": {k: v * 1e3 for k, v in times.items()},
                "speedup_batch32": times["dense"] / times["pruned"],
                "minutes": (time.perf_counter() - began) / 60,
            },
        )
        print(
            f"  accuracy {acc:.2%} (retention {acc / teacher_acc:.1%}), encoder "
            f"{encoder:,} ({encoder / dense_encoder:.2%}), heads {sum(heads)}, speedup "
            f"{times['dense'] / times['pruned']:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
