"""torch-pruning's GQA head pruning on the Llama of accuracy_lm.py, made to work on transformers 5.

``prune_llama_tp`` prunes a transformers ``LlamaForCausalLM`` with grouped key/value heads in
place with torch-pruning 1.6.1, to a parameter target counted in grainfx's units (W_Q, W_K,
W_V rows and W_O columns, FFN gate/up rows and down columns, with biases: ``unit_parameters``).

torch-pruning configuration (as in its ``examples/LLMs/prune_llm.py``, ``use_cache=False``,
``prune_num_heads=True``, ``prune_head_dims=False`` so RoPE is left alone, lm_head ignored;
embeddings ignored too, so the hidden size is not pruned, like GRAIN):

1. Key/value groups, one shot, the same count in every layer: torch-pruning's
   ``DependencyGraph`` (traced with the patches below) gives, for each layer, the group of
   o_proj's input channels: the q_proj rows and, through its repeat_kv index mapping, the K and
   V rows they read. ``GroupTaylorImportance`` (gradients of the model's own next-token loss)
   scores the group's query channels; the key/value groups with the lowest mean score go,
   each with its ``n_rep`` query heads (``group.prune()``). ``MetaPruner`` cannot do this step
   itself: with ``num_heads`` = key/value heads for q/k/v it takes the head size from v_proj
   (the first of q/k/v in the group), n_rep times too narrow, and with q_proj alone it assumes
   a fused qkv projection (head size out_features / (3 x heads)); both remove wrong rows.
2. Query heads (only where the budget needs it): torch-pruning's own GQA path, ``MetaPruner``
   with ``GroupTaylorImportance``, ``num_heads`` = query heads for q_proj and key/value heads
   for k_proj / v_proj, ``global_pruning=False`` (its global GQA head ranking offsets the
   groups by ``kv_head_id * num_kv_heads`` instead of by the query heads per group),
   ``iterative_steps=1``, ``head_pruning_ratio`` solved for the count, ``pruning_ratio=0.5``
   only so that the attention groups are visited, FFN ignored: it removes the same number of
   query heads in every key/value group and keeps K and V.
3. FFN channels: ``MetaPruner`` with ``global_pruning=True`` (ranked across layers),
   ``iterative_steps`` steps with fresh Taylor gradients before each, attention ignored;
   gate_proj / up_proj rows and down_proj columns go together (one dependency group).

What had to be patched by hand (all undone when the function returns, except the model's own
attributes in point 5):

1. Tracing hangs forever without it: RoPE's ``rotate_half`` ends in ``torch.cat(..., dim=-1)``;
   ``CatBackward0._saved_dim`` reads the -1 back as 2**64 - 1, which torch-pruning takes for
   "uninitialized" (a PyTorch 1.11 workaround) instead of "not the channel dim", so it gives the
   cat a concat index mapping (offsets +0 / +half). On the key path of a GQA model the sizes
   happen to check out (2 x the K width = the query width when n_rep = 2), and the elementwise
   diamond ``k * cos + rotate_half(k) * sin`` is a cycle in the dependency graph that passes the
   cat forward one way and back the other: every turn adds the offset to the indices again, so
   ``get_pruning_group``'s visited test (same node *and* same indices) never matches and the
   walk never ends (indices grow without bound; without GQA the size check rejects the mapping
   and nothing happens). Patch: ``update_concat_index_mapping`` skips cats on a negative dim.
2. repeat_kv's index mapping lists every K/V row once per query head that reads it, and
   torch-pruning counts the list, not the rows: ``check_pruning_group`` refuses to remove half
   of the key/value groups (as many indices as K has rows), and ``prune_linear_out_channels``
   sets ``out_features -= len(idxs)`` (the weight is right, the attribute n_rep times too
   small, which later steps read). Patch: the group's indices are made distinct before it is
   checked and pruned.
3. torch-pruning's GQA query-head path decides "GQA?" after it has lowered the query head count:
   when the pruned query heads equal the key/value heads (always, with n_rep = 2 and one query
   head removed per group) it forgets to spare K and V, maps the removed query heads onto every
   K/V row and the group is refused. Patch (step 2 only): the K/V projections' out-channel
   items of a query-head group are emptied, which is what its GQA branch means to do.
4. The graph has to be traced with eager attention: with ``sdpa`` (torch's ``enable_gqa``)
   there is no repeat_kv in the graph, so torch-pruning couples query and key channels one to
   one and removes the wrong K/V rows without a word (the model still runs). The function
   switches ``config._attn_implementation`` to ``"eager"`` while pruning and back afterwards.
5. transformers' modules keep their own counts: ``num_key_value_groups`` (read by forward) of
   every attention, ``intermediate_size`` of every MLP; the config's ``num_attention_heads`` /
   ``num_key_value_heads`` (with ``head_dim`` pinned, since it is derived from them) are set to
   the pruned counts. ``config.intermediate_size`` stays dense: FFN widths differ per layer, so
   ``save_pretrained``/``from_pretrained`` cannot rebuild the model (``torch.save`` of the module
   can).

Limits: at least one key/value group with one query head and one FFN channel per layer
(torch-pruning never empties a layer), the same heads in every layer, and query heads go the
same number per group; so small targets may not be reached (the function warns and returns the
smallest model it could make). FFN channels are ranked globally; a step that would empty a
layer's FFN is refused for that layer, which then keeps more than planned (warned).

    OMP_NUM_THREADS=1 python benchmarks/peer_torch_pruning_lm.py        # tiny GQA Llama check
    OMP_NUM_THREADS=1 python benchmarks/peer_torch_pruning_lm.py --real # accuracy_lm.py's shape
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LMShape, llama_lm  # noqa: E402

EPS = 1e-9
#: The installed distribution's version (torch_pruning.__version__ of 1.6.1 still says 1.6.0).
TP_VERSION = importlib.metadata.version("torch-pruning")


# ---- the model in grainfx's units -----------------------------------------------------------


def _params(linear: torch.nn.Linear, rows: bool) -> int:
    """Parameters of a Linear as grainfx counts them: rows with bias, or columns only."""
    if rows:
        bias = linear.bias.numel() if linear.bias is not None else 0
        return linear.weight.numel() + bias
    return linear.weight.numel()


def unit_parameters(model) -> int:
    """Prunable parameters: W_Q, W_K, W_V rows (+ biases), W_O columns, FFN gate/up rows
    (+ biases) and down columns, over every decoder layer."""
    total = 0
    for layer in model.model.layers:
        a, f = layer.self_attn, layer.mlp
        total += sum(_params(p, True) for p in (a.q_proj, a.k_proj, a.v_proj))
        total += _params(a.o_proj, False)
        total += _params(f.gate_proj, True) + _params(f.up_proj, True)
        total += _params(f.down_proj, False)
    return total


def layer_widths(model) -> list[dict]:
    """Per layer: key/value groups, query heads, head size and FFN width."""
    rows = []
    for layer in model.model.layers:
        a = layer.self_attn
        rows.append(
            {
                "kv_groups": a.k_proj.out_features // a.head_dim,
                "heads": a.q_proj.out_features // a.head_dim,
                "head_dim": a.head_dim,
                "ffn": layer.mlp.gate_proj.out_features,
            }
        )
    return rows


def plan(model, target: int) -> dict:
    """Key/value groups and query heads per group (the same in every layer) and FFN channels
    (in all) to keep for ``target`` unit parameters.

    Attention keeps the share of its dense size that the target keeps of the whole (rounded
    to the nearest (groups, heads per group) torch-pruning can make, at least one of each,
    never above the target); FFN channels take the rest, at least one per layer.
    """
    cfg, layers = model.config, model.model.layers
    a, f = layers[0].self_attn, layers[0].mlp
    groups, hd = a.k_proj.out_features // a.head_dim, a.head_dim
    rep = a.q_proj.out_features // a.k_proj.out_features
    hidden = cfg.hidden_size
    q_row, kv_row = a.q_proj.in_features + _bias(a.q_proj), a.k_proj.in_features + _bias(a.k_proj)
    v_row = a.v_proj.in_features + _bias(a.v_proj)

    def attention(g: int, r: int) -> int:  # one layer
        return g * hd * (r * q_row + kv_row + v_row + r * hidden)

    neuron = 2 * (f.gate_proj.in_features + _bias(f.gate_proj)) + f.down_proj.out_features
    neurons = sum(layer.mlp.gate_proj.out_features for layer in layers)
    n = len(layers)
    share = target / unit_parameters(model)
    options = sorted(
        ((g, r) for g in range(1, groups + 1) for r in range(1, rep + 1)),
        key=lambda gr: (abs(attention(*gr) - share * attention(groups, rep)), -gr[0]),
    )
    fitting = [gr for gr in options if n * attention(*gr) + n * neuron <= target]
    g, r = fitting[0] if fitting else min(options, key=lambda gr: attention(*gr))
    keep_neurons = min(neurons, max(n, round((target - n * attention(g, r)) / neuron)))
    return {
        "kv_groups_per_layer": g,
        "heads_per_group": r,
        "heads": n * g * r,
        "ffn": keep_neurons,
        "query_ratio": (rep - r) / rep - EPS,
        "ffn_ratio": 1 - (keep_neurons + 0.5) / neurons,
        "unit_parameters": n * attention(g, r) + keep_neurons * neuron,
        "reachable": bool(fitting),
    }


def _bias(linear: torch.nn.Linear) -> int:
    return 1 if linear.bias is not None else 0


# ---- patches of torch-pruning 1.6.1 ---------------------------------------------------------


@contextlib.contextmanager
def _tp_patches():
    """Patch 1 of the docstring, undone on exit."""
    from torch_pruning.dependency import index_mapping

    concat = index_mapping.update_concat_index_mapping

    def concat_on_channels_only(graph, node):
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if dim is not None and dim >= 2**63:  # a negative dim read back as unsigned
            return None
        return concat(graph, node)

    index_mapping.update_concat_index_mapping = concat_on_channels_only
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = concat


def _distinct(group):
    """Patch 2: every item of ``group`` with its indices once (repeat_kv lists each K/V row
    once per query head that reads it)."""
    from torch_pruning import _helpers

    for i, item in enumerate(group):
        distinct = _helpers.GroupItem(item.dep, sorted({int(j) for j in item.idxs}))
        distinct.root_idxs = item.root_idxs
        group[i] = distinct
    return group


@contextlib.contextmanager
def _eager(model):
    """Patch 4: eager attention (repeat_kv in the graph) while tracing."""
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = before


def _spare_kv(pruner, kv_layers: set) -> None:
    """Patch 3: K/V rows are never removed by a query-head group (the pruner's own GQA branch
    means to do this but skips it when the query heads left equal the key/value heads)."""
    check = pruner.DG.check_pruning_group

    def sparing(group):
        for i, (dep, _) in enumerate(group):
            if dep.target.module in kv_layers and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                group[i] = (dep, [])
        return check(group)

    pruner.DG.check_pruning_group = sparing


def _prune_kv_groups(model, example_input_ids, importance, keep: int) -> None:
    """Keep the ``keep`` key/value groups (with all their query heads) of every layer whose
    query channels have the highest importance (mean over the group's channels), through
    torch-pruning's dependency graph: the group of a layer's o_proj input channels holds its
    q_proj rows and, through repeat_kv's index mapping, the K and V rows they read."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(
        model, example_input_ids, output_transform=lambda out: out.logits.sum(), verbose=False
    )
    drops = []
    for layer in model.model.layers:
        a = layer.self_attn
        groups = a.k_proj.out_features // a.head_dim
        width = a.q_proj.out_features // groups  # query channels of one key/value group
        group = graph.get_pruning_group(
            a.o_proj, tp.prune_linear_in_channels, list(range(a.o_proj.in_features))
        )
        score = importance(group).view(groups, width).mean(1)
        drop = torch.argsort(score)[: groups - keep].tolist()
        drops.append((a, [c for j in sorted(drop) for c in range(j * width, (j + 1) * width)]))
    for a, channels in drops:  # scores first: pruning a layer prunes its gradients
        group = _distinct(graph.get_pruning_group(a.o_proj, tp.prune_linear_in_channels, channels))
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"torch-pruning refused {group}")
        group.prune()


def _set_counts(model) -> None:
    """Patch 5: the head and FFN counts transformers' modules and config read."""
    cfg = model.config
    for layer in model.model.layers:
        a = layer.self_attn
        a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
    a = model.model.layers[0].self_attn
    cfg.head_dim = a.head_dim
    cfg.num_attention_heads = a.q_proj.out_features // a.head_dim
    cfg.num_key_value_heads = a.k_proj.out_features // a.head_dim


# ---- pruning --------------------------------------------------------------------------------


def _forever(batches):
    while True:
        yield from batches


def taylor_gradients(model, batches, count: int) -> None:
    """Gradients of the model's own loss (``labels`` in the batches) over the next ``count``
    batches of the iterator ``batches``: what Taylor importance reads."""
    model.zero_grad(set_to_none=True)
    for batch in itertools.islice(batches, count):
        model(**batch).loss.backward()


def head_pruner(model, example, importance, num_heads: dict, ratio: float, ignored_layers: list):
    """torch-pruning's ``MetaPruner`` that removes ``ratio`` of the heads of every attention in
    one step, the same count in every layer (``global_pruning=False``: its global head ranking
    empties layers at these densities, and offsets GQA groups wrongly), each head whole."""
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        global_pruning=False,
        iterative_steps=1,
        pruning_ratio=0.5,  # only > 0 so that the attention groups are visited
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        ignored_layers=ignored_layers,
        output_transform=lambda out: out.logits.sum(),
    )


def prune_ffn_globally(
    model, example, importance, ratio: float, steps: int, ignored_layers: list, gradients, show
) -> None:
    """Remove ``ratio`` of the FFN channels, ranked across layers, in ``steps`` iterative
    steps of torch-pruning's ``MetaPruner``; ``gradients()`` runs before each step (fresh
    Taylor gradients) and ``show(what)`` after it."""
    import torch_pruning as tp

    neurons = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        global_pruning=True,
        iterative_steps=steps,
        pruning_ratio=ratio,
        ignored_layers=ignored_layers,
        output_transform=lambda out: out.logits.sum(),
    )
    for step in range(steps):
        gradients()
        for group in neurons.step(interactive=True):
            group.prune()
        show(f"FFN step {step + 1}/{steps}")


def prune_llama_tp(
    model,
    example_input_ids: torch.Tensor,
    target_params_in_units: int,
    batches=None,
    ffn_steps: int = 5,
    grad_batches: int = 4,
    verbose: bool = False,
):
    """Prune ``model`` (a transformers ``LlamaForCausalLM``) in place with torch-pruning to
    about ``target_params_in_units`` unit parameters (see ``unit_parameters``); returns it.

    ``batches``: an iterable of model inputs with ``labels`` (accuracy_lm.py's ``Batches``)
    whose next-token loss gives the Taylor gradients, ``grad_batches`` of them before each
    pruning step; None: the example ids are their own labels. ``ffn_steps``: iterative FFN
    steps. The plan is in ``model.torch_pruning_plan``; see the module docstring for the
    configuration and the hand patches.
    """
    import torch_pruning as tp

    if batches is None:
        batches = [{"input_ids": example_input_ids, "labels": example_input_ids}]
    plan_ = plan(model, target_params_in_units)
    if not plan_["reachable"]:
        warnings.warn(
            f"torch-pruning cannot reach {target_params_in_units:,} unit parameters "
            f"(one key/value group with one query head and one FFN channel per layer); "
            f"pruning to {plan_['unit_parameters']:,}",
            stacklevel=2,
        )
    stream = _forever(batches)
    layers = model.model.layers
    attentions = [layer.self_attn for layer in layers]
    ffn = [layer.mlp for layer in layers]
    outside = [model.lm_head, model.model.embed_tokens]
    kv_layers = {p for a in attentions for p in (a.k_proj, a.v_proj)}
    taylor = tp.importance.GroupTaylorImportance()
    use_cache, model.config.use_cache = model.config.use_cache, False

    def show(what: str) -> None:
        if verbose:
            widths = layer_widths(model)
            print(
                f"  {what}: kv groups {[w['kv_groups'] for w in widths]}, heads "
                f"{[w['heads'] for w in widths]}, FFN {[w['ffn'] for w in widths]}",
                flush=True,
            )

    with _tp_patches(), _eager(model), warnings.catch_warnings():
        # the norms' weights are "unwrapped parameters": the hidden size is not pruned here
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        if plan_["kv_groups_per_layer"] < layer_widths(model)[0]["kv_groups"]:
            taylor_gradients(model, stream, grad_batches)
            _prune_kv_groups(model, example_input_ids, taylor, plan_["kv_groups_per_layer"])
            _set_counts(model)
            show("key/value groups pruned")
        if plan_["query_ratio"] > 0:
            heads = {}
            for a in attentions:
                heads[a.q_proj] = a.q_proj.out_features // a.head_dim
                heads[a.k_proj] = heads[a.v_proj] = a.k_proj.out_features // a.head_dim
            taylor_gradients(model, stream, grad_batches)
            pruner = head_pruner(
                model, example_input_ids, taylor, heads, plan_["query_ratio"], outside + ffn
            )
            _spare_kv(pruner, kv_layers)
            for group in pruner.step(interactive=True):
                group.prune()
            _set_counts(model)
            show("query heads pruned")
        if plan_["ffn_ratio"] > 0:
            prune_ffn_globally(
                model,
                example_input_ids,
                taylor,
                plan_["ffn_ratio"],
                ffn_steps,
                outside + [p for a in attentions for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)],
                lambda: taylor_gradients(model, stream, grad_batches),
                show,
            )
        _set_counts(model)
    model.zero_grad(set_to_none=True)
    model.config.use_cache = use_cache
    widths = layer_widths(model)
    got = (sum(w["heads"] for w in widths), sum(w["ffn"] for w in widths))
    if got != (plan_["heads"], plan_["ffn"]):
        warnings.warn(f"torch-pruning kept {widths}, not the plan {plan_}", stacklevel=2)
    model.torch_pruning_plan = plan_
    return model


# ---- a check on a tiny model ----------------------------------------------------------------


def _kept_rows(pruned: torch.Tensor, dense: torch.Tensor) -> list[int]:
    """Which dense rows the pruned weight kept, in order (rows are matched exactly)."""
    return [int((dense == row).all(dim=1).nonzero()[0]) for row in pruned]


def masked_dense(dense, pruned):
    """The dense model with the pruned model's removed query heads (W_O columns) and FFN
    channels (down columns) zeroed; it computes what the pruned model must compute if
    torch-pruning kept each query head with its own key/value head."""
    import copy

    masked = copy.deepcopy(dense)
    for d, p, m in zip(dense.model.layers, pruned.model.layers, masked.model.layers, strict=True):
        hd = d.self_attn.head_dim
        rep = d.self_attn.num_key_value_groups
        q_rows = _kept_rows(p.self_attn.q_proj.weight, d.self_attn.q_proj.weight)
        k_rows = _kept_rows(p.self_attn.k_proj.weight, d.self_attn.k_proj.weight)
        v_rows = _kept_rows(p.self_attn.v_proj.weight, d.self_attn.v_proj.weight)
        heads = [q_rows[i] // hd for i in range(0, len(q_rows), hd)]
        kv = [k_rows[i] // hd for i in range(0, len(k_rows), hd)]
        assert k_rows == v_rows, "K and V kept different rows"
        rep_now = len(heads) // len(kv)
        # the i-th pruned query head must read the (i // rep_now)-th kept key/value head
        assert all(h // rep == kv[i // rep_now] for i, h in enumerate(heads)), (heads, kv)
        cols = torch.zeros(d.self_attn.o_proj.in_features, dtype=torch.bool)
        for h in heads:
            cols[h * hd : (h + 1) * hd] = True
        m.self_attn.o_proj.weight.data[:, ~cols] = 0
        ffn = _kept_rows(p.mlp.gate_proj.weight, d.mlp.gate_proj.weight)
        keep = torch.zeros(d.mlp.down_proj.in_features, dtype=torch.bool)
        keep[ffn] = True
        m.mlp.down_proj.weight.data[:, ~keep] = 0
    return masked


def main(argv=None) -> int:
    import argparse
    import copy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="accuracy_lm.py's teacher shape")
    parser.add_argument("--density", type=float, nargs="+", default=[0.2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = LMShape() if args.real else LMShape(vocab=128, hidden=64, layers=2, ffn=96)
    dense = llama_lm(shape).eval()
    vocab = shape.vocab
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    batches = [
        {"input_ids": x, "labels": x}
        for x in torch.randint(0, vocab, (4, 4, 32), generator=torch.Generator().manual_seed(2))
    ]
    before = unit_parameters(dense)
    for density in args.density:
        student = copy.deepcopy(dense)
        began = time.perf_counter()
        prune_llama_tp(student, ids, round(density * before), batches, ffn_steps=3, verbose=True)
        seconds = time.perf_counter() - began
        student.eval()
        with torch.no_grad():
            out = student(input_ids=ids, labels=ids)
            sdpa = out.logits
            student.config._attn_implementation = "eager"
            eager = student(input_ids=ids).logits
            student.config._attn_implementation = "sdpa"
            reference = masked_dense(dense, student)(input_ids=ids).logits
        after, planned = unit_parameters(student), student.torch_pruning_plan["unit_parameters"]
        print(
            f"density {density:.0%}: pruned in {seconds:.2f}s to {after:,} of {before:,} unit "
            f"parameters ({after / before:.1%}; plan {planned:,}), "
            f"{layer_widths(student)}; logits {tuple(out.logits.shape)}, loss {out.loss:.4f}, "
            f"max |pruned - masked dense| {(sdpa - reference).abs().max():.2e} (sdpa), "
            f"{(eager - reference).abs().max():.2e} (eager)",
            flush=True,
        )
        assert out.logits.shape == (2, 32, vocab) and math.isfinite(out.loss.item())
        assert torch.allclose(sdpa, reference, atol=1e-4), "pruned model computes another function"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
