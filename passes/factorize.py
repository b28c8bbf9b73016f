"""Factorize the word embedding: E (vocab x d) ~ (U_r S_r) V_r by truncated SVD.

The embedding lookup ``embedding(E, ids)`` becomes ``linear(embedding(U_r S_r, ids), V_r^T)``:
a table of width ``rank`` followed by a bias-free projection to the model width. Both are
parameters and can be trained afterwards.

Preserves computation: approximately (exactly when ``rank`` >= the rank of E).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch
from torch import fx

from passes.capture import derive
from passes.errors import DiscoverError
from passes.graph import aten, attr_tensor, is_op, set_attr, set_attr_delete

TABLE = "grain_embedding.table"
PROJECTION = "grain_embedding.projection"


def word_embedding(gm: fx.GraphModule) -> fx.Node:
    """The lookup of the word embedding: the first ``aten.embedding`` reading an input."""
    for node in gm.graph.nodes:
        if is_op(node, [aten.embedding.default]) and node.args[0].op == "get_attr":
            ids = node.args[1]
            while ids.op == "call_function" and ids.args:
                ids = ids.args[0]
            if isinstance(ids, fx.Node) and ids.op == "placeholder":
                return node
    raise DiscoverError("no word embedding (an aten.embedding of a graph input) was found")


def _fake_values(gm: fx.GraphModule, lookup: fx.Node, *nodes: fx.Node) -> None:
    """Give the new nodes the shape metadata (meta["val"]) that export gave the others."""
    val = lookup.meta.get("val")
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return
    for node in nodes:
        if node.op == "get_attr":
            node.meta["val"] = mode.from_tensor(attr_tensor(gm, node))
        else:
            with mode:
                args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
                op = cast(Callable[..., Any], node.target)  # a call_function node's op
                node.meta["val"] = op(*args)


def factorize_embedding(
    gm: fx.GraphModule, rank: int, share_with: fx.GraphModule | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` whose word embedding is factorized to ``rank`` (see module doc).

    ``share_with``: a graph factorized before (e.g. the train-mode graph of the same model)
    whose table and projection are reused, so both graphs train the same parameters.

    Raises DiscoverError when the embedding is tied to another use (e.g. GPT-2's LM head),
    since replacing it would keep the full table and add parameters.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = derive(gm, graph)
    lookup = next(n for n in new.graph.nodes if n.name == word_embedding(gm).name)
    weight_node = lookup.args[0]
    if len(weight_node.users) > 1:
        raise DiscoverError(
            f"the word embedding {weight_node.target} is also used by "
            f"{[u.name for u in weight_node.users if u is not lookup]} (tied "
            f"weights): factorizing it would not make the model smaller"
        )
    weight = attr_tensor(new, weight_node).detach()
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in [1, {min(weight.shape)}], got {rank}")
    new.add_module("grain_embedding", torch.nn.Module())
    if share_with is not None:
        set_attr(new, TABLE, attr_tensor(share_with, TABLE))
        set_attr(new, PROJECTION, attr_tensor(share_with, PROJECTION))
    else:
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        set_attr(new, TABLE, torch.nn.Parameter((u[:, :rank] * s[:rank]).to(weight.dtype)))
        set_attr(new, PROJECTION, torch.nn.Parameter(vh[:rank].t().contiguous().to(weight.dtype)))
    with new.graph.inserting_before(lookup):
        table = new.graph.get_attr(TABLE)
        small = new.graph.call_function(aten.embedding.default, (table, *lookup.args[1:]))
        proj = new.graph.get_attr(PROJECTION)
        full = new.graph.call_function(aten.linear.default, (small, proj))
    _fake_values(new, lookup, table, small, proj, full)
    lookup.replace_all_uses_with(full)
    new.graph.erase_node(lookup)
    new.graph.erase_node(weight_node)
    new.graph.lint()
    set_attr_delete(new, weight_node.target)
    new.recompile()
    return new
