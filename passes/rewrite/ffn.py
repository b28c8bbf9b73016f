"""Rewrite of FFN blocks: kept neurons' rows of the up (and gate) projection and columns of
the down projection, sliced in place; an empty block becomes the down projection's bias.

A fused up/gate projection (one weight, split in the graph) keeps the kept rows of each piece
and its split is resized; separate up and gate projections become one matmul, split in two.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from passes.graph import Projection, arg_node, aten, attr_tensor, is_op, set_attr
from passes.rewrite.emit import Emitter
from passes.structure import FFNBlock


def rewrite_ffn(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], block: FFNBlock, mask: torch.Tensor, merge: bool
) -> dict:
    """Slice ``block`` to the neurons ``mask`` keeps; returns the kept width for the record.
    ``merge``: separate up and gate projections become one matmul."""
    kept = torch.nonzero(mask).flatten().tolist()
    if not kept:
        down = nodes[block.down.node]
        emit = Emitter(gm, block.name, down)
        down.replace_all_uses_with(
            emit.constant_output(
                nodes[block.up.input], block.down.linear_bias(gm), block.down.out_features
            )
        )
        return {"ffn": 0}
    pieces = [p for p in (block.up, block.gate) if p is not None]
    by_weight: dict[str, list[Projection]] = {}
    for proj in pieces:
        by_weight.setdefault(proj.weight, []).append(proj)
    for projs in by_weight.values():
        rows = sorted(r for p in projs for r in (p.output_rows()[i] for i in kept))
        _slice_outputs(gm, projs[0], rows)
        if len(projs) > 1 or projs[0].rows is not None or projs[0].start:
            for proj in projs:
                _resize_split(nodes[proj.node], block.width, len(kept))
    _slice_inputs(gm, block.down, kept)
    if (
        merge
        and block.gate is not None
        and len(by_weight) == 2
        and all(p.rows is None and not p.start for p in pieces)
        and ((block.up.bias is None) == (block.gate.bias is None))
    ):
        _merge(gm, nodes, block, block.gate)
    width, new = block.width, len(kept)
    for name in (block.up.node, block.down.input_user, *block.region):
        node = nodes[name]
        if is_op(node, [aten.view.default, aten.reshape.default]):
            args: list[Any] = list(node.args)
            sizes = list(args[1])
            if sizes and sizes[-1] == width:
                node.args = (args[0], sizes[:-1] + [new])
    return {"ffn": new}


def _merge(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], block: FFNBlock, gate: Projection
) -> None:
    """Compute the (sliced) gate and up projections as one matmul, split in two."""
    pieces = (gate, block.up)
    first = next(n for n in gm.graph.nodes if n.name in (gate.node, block.up.node))
    emit = Emitter(gm, block.name, first)

    def weight(p: Projection) -> torch.Tensor:
        w = attr_tensor(gm, p.weight).detach()
        return w.t() if p.transposed else w

    ws = [weight(p) for p in pieces]
    w = emit.tensor("gate_up", torch.cat(ws), True)
    b = (
        None
        if block.up.bias is None
        else emit.tensor(
            "gate_up_bias",
            torch.cat([attr_tensor(gm, p.bias).detach() for p in pieces if p.bias is not None]),
            True,
        )
    )
    split = emit.call(
        aten.split_with_sizes.default,
        emit.call(aten.linear.default, nodes[block.up.input], w, b),
        [len(x) for x in ws],
        -1,
    )
    for i, p in enumerate(pieces):
        nodes[p.node].replace_all_uses_with(emit.call(operator.getitem, split, i))


def _resize_split(piece: fx.Node, width: int, new: int) -> None:
    """Make the split that ``piece`` (a getitem) comes from cut pieces of ``new``, not
    ``width``, features."""
    if piece.op != "call_function" or piece.target is not operator.getitem:
        raise AssertionError(f"{piece.name} is not a piece of a split")
    split = arg_node(piece, 0)
    if split.target is aten.chunk.default:
        return  # equal pieces stay equal
    args: list[Any] = list(split.args)
    if split.target is aten.split.Tensor and args[1] == width:
        args[1] = new
    elif split.target is aten.split_with_sizes.default:
        args[1] = [new if s == width else s for s in args[1]]
    else:
        raise AssertionError(f"cannot resize the split {split.name} ({split.target})")
    split.args = tuple(args)


def _slice_outputs(gm: fx.GraphModule, proj: Projection, rows: list[int]) -> None:
    w = attr_tensor(gm, proj.weight).detach()
    set_attr(
        gm,
        proj.weight,
        torch.nn.Parameter(
            (w[:, rows] if proj.transposed else w[rows]).clone(), requires_grad=False
        ),
    )
    if proj.bias is not None:
        b = attr_tensor(gm, proj.bias).detach()
        set_attr(gm, proj.bias, torch.nn.Parameter(b[rows].clone(), requires_grad=False))


def _slice_inputs(gm: fx.GraphModule, proj: Projection, kept: list[int]) -> None:
    w = attr_tensor(gm, proj.weight).detach()
    set_attr(
        gm,
        proj.weight,
        torch.nn.Parameter(
            (w[kept] if proj.transposed else w[:, kept]).clone(), requires_grad=False
        ),
    )
