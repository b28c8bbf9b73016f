"""The emitter: adds the compact parameters, buffers and ops of one block to a graph."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from passes.graph import aten, set_attr, shape

COMPACT_MODULE = "compact"
#: An index that stands for a zero row (padding) in :meth:`Emitter.padded`.
PAD = -1


class Emitter:
    """Adds parameters, buffers and ops for one block just before ``anchor``."""

    def __init__(self, gm: fx.GraphModule, block: str, anchor: fx.Node):
        self.gm, self.block, self.graph, self.anchor = gm, block, gm.graph, anchor
        if not hasattr(gm, COMPACT_MODULE):
            gm.add_module(COMPACT_MODULE, torch.nn.Module())

    def tensor(self, name: str, value: torch.Tensor, parameter: bool) -> fx.Node:
        target = f"{COMPACT_MODULE}.{self.block}_{name}"
        value = value.detach().clone().contiguous()
        set_attr(
            self.gm, target, torch.nn.Parameter(value, requires_grad=False) if parameter else value
        )
        with self.graph.inserting_before(self.anchor):
            return self.graph.get_attr(target)

    def call(
        self, op: Callable[..., Any], *args: fx.node.Argument, **kwargs: fx.node.Argument
    ) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self.graph.call_function(op, args, kwargs)

    def padded(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, index: list[int]
    ) -> tuple[fx.Node, fx.Node | None]:
        """Rows ``index`` of (weight, bias) with PAD rows as zeros: kept rows are parameters,
        the padding is a gather at run time."""
        kept = [i for i in index if i != PAD]
        w = self.tensor(f"{name}_weight", weight[kept], True)
        b = self.tensor(f"{name}_bias", bias[kept], True) if bias is not None else None
        if len(kept) == len(index):
            return w, b
        pos = torch.tensor([len(kept) if i == PAD else kept.index(i) for i in index])
        gather = self.tensor(f"{name}_pad_index", pos, False)
        w = self.call(
            aten.index_select.default,
            self.call(aten.constant_pad_nd.default, w, [0, 0, 0, 1]),
            0,
            gather,
        )
        if b is not None:
            b = self.call(
                aten.index_select.default,
                self.call(aten.constant_pad_nd.default, b, [0, 1]),
                0,
                gather,
            )
        return w, b

    def constant_output(self, like: fx.Node, bias: torch.Tensor | None, width: int) -> fx.Node:
        """``bias`` (or zeros) broadcast to ``like``'s leading dims and ``width`` features, as
        a tensor of its own (the model may add to it in place)."""
        dims = shape(like)
        assert dims is not None  # export records the shape of every tensor node
        ndim = len(dims)
        value = (
            self.tensor("bias", bias, True)
            if bias is not None
            else self.tensor("zeros", torch.zeros(width), False)
        )
        sizes = [self.call(aten.sym_size.int, like, i) for i in range(ndim - 1)] + [width]
        return self.call(aten.clone.default, self.call(aten.expand.default, value, sizes))
