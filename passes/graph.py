"""Small helpers shared by the passes: op sets, projection matching, shapes, dead-code removal."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import fx

aten = torch.ops.aten

#: Ops that only move or reshape data: the head split / merge of attention goes through them.
LAYOUT_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.unflatten.int,
    aten.flatten.using_ints,
}
#: Ops that are the identity at inference time or only change dtype.
PASSTHROUGH_OPS = {
    aten.dropout.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
    aten.clone.default,
    aten.contiguous.default,
}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
#: Ops that are kept by dead-code removal even when nothing reads them.
_SIDE_EFFECT_OPS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def is_op(node: fx.Node, ops: Iterable) -> bool:
    """True when ``node`` calls one of ``ops``."""
    return node.op == "call_function" and node.target in set(ops)


def shape(node: fx.Node) -> tuple | None:
    """The (possibly symbolic) shape recorded by export on ``node``, or None."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def static(dim) -> int | None:
    """``dim`` as an int when it is static, else None."""
    return dim if isinstance(dim, int) else None


def live_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than metadata asserts."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def attr_tensor(gm: fx.GraphModule, node_or_target) -> torch.Tensor:
    """The tensor behind a get_attr node (or its target string)."""
    target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: fx.GraphModule, target: str, value) -> None:
    """Set ``gm.<target>`` (dotted), replacing a parameter or buffer of the same name."""
    *path, name = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    if name in owner._parameters:
        del owner._parameters[name]
    if name in owner._buffers:
        del owner._buffers[name]
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(name, value)
    else:
        setattr(owner, name, value)


@dataclass(frozen=True)
class Projection:
    """A linear projection found in the graph.

    ``node`` is the projection's result with features last (for a fused QKV projection, the piece
    that belongs to this projection); ``input`` is the tensor it reads, features last;
    ``input_user`` is the first node that reads ``input`` on the way into the matmul.
    ``weight`` and ``bias`` are get_attr targets. ``transposed`` marks weights stored
    (in, out) as GPT-2's Conv1D does; ``start:stop`` are this projection's output features
    within the stored weight.
    """

    node: str
    input: str
    input_user: str
    weight: str
    bias: str | None
    transposed: bool
    start: int
    stop: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def linear_weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """This projection's weight in nn.Linear layout (out, in), detached."""
        w = attr_tensor(gm, self.weight).detach()
        w = w.t() if self.transposed else w
        return w[self.start:self.stop]

    def linear_bias(self, gm: fx.GraphModule) -> torch.Tensor | None:
        """This projection's bias (out,), detached, or None."""
        if self.bias is None:
            return None
        return attr_tensor(gm, self.bias).detach()[self.start:self.stop]

    def params_per_output(self) -> int:
        """Parameters that one output feature (a weight row and its bias) holds."""
        return self.in_features + (1 if self.bias is not None else 0)

    def with_slice(self, node: str, start: int, stop: int) -> "Projection":
        return Projection(node, self.input, self.input_user, self.weight, self.bias,
                          self.transposed, start, stop, self.in_features)


def _get_attr(node) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target
    return None


def match_projection(node: fx.Node) -> Projection | None:
    """The projection whose output is ``node``: ``aten.linear`` or Conv1D's view-addmm-view."""
    if is_op(node, [aten.linear.default]):
        weight = _get_attr(node.args[1])
        bias = _get_attr(node.args[2]) if len(node.args) > 2 else None
        if weight is None or (len(node.args) > 2 and node.args[2] is not None and bias is None):
            return None
        out = node.args[1].meta["val"].shape
        return Projection(node.name, node.args[0].name, node.name, weight, bias, False,
                          0, int(out[0]), int(out[1]))
    if is_op(node, [aten.view.default, aten.reshape.default]):
        mm = node.args[0]
        if is_op(mm, [aten.addmm.default, aten.mm.default]):
            if mm.target is aten.addmm.default:
                bias, flat, weight = _get_attr(mm.args[0]), mm.args[1], _get_attr(mm.args[2])
                if bias is None:
                    return None
            else:
                bias, flat, weight = None, mm.args[0], _get_attr(mm.args[1])
            if weight is None or not is_op(flat, [aten.view.default, aten.reshape.default]):
                return None
            w = mm.args[-1].meta["val"].shape
            return Projection(node.name, flat.args[0].name, flat.name, weight, bias, True,
                              0, int(w[1]), int(w[0]))
    return None


def match_projection_from_input(node: fx.Node) -> Projection | None:
    """The projection that reads ``node`` (its only live user, or that user's flattening view)."""
    users = live_users(node)
    if len(users) != 1:
        return None
    user = users[0]
    if is_op(user, [aten.linear.default]) and user.args[0] is node:
        return match_projection(user)
    if is_op(user, [aten.view.default, aten.reshape.default]):
        mm_users = live_users(user)
        if len(mm_users) == 1 and is_op(mm_users[0], [aten.addmm.default, aten.mm.default]):
            outs = live_users(mm_users[0])
            if len(outs) == 1:
                return match_projection(outs[0])
    return None


def split_piece(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """For ``getitem(split(x, ...), i)`` or a last-dim slice: (x, start, stop) of the piece."""
    if node.op == "call_function" and node.target is operator.getitem:
        split, index = node.args
        if not is_op(split, SPLIT_OPS):
            return None
        src = split.args[0]
        ndim = len(shape(src))
        if split.target is aten.unbind.int:
            return None
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if dim % ndim != ndim - 1:
            return None
        total = static(shape(src)[-1])
        if split.target is aten.split.Tensor:
            size = split.args[1]
            sizes = [size] * (total // size) + ([total % size] if total % size else [])
        elif split.target is aten.chunk.default:
            chunks = split.args[1]
            size = -(-total // chunks)
            sizes = [min(size, total - i * size) for i in range(chunks)]
        else:
            sizes = list(split.args[1])
        start = sum(sizes[:index])
        return src, start, start + sizes[index]
    if is_op(node, [aten.slice.Tensor]):
        src = node.args[0]
        ndim = len(shape(src))
        dim = node.args[1] if len(node.args) > 1 else 0
        if dim % ndim != ndim - 1:
            return None
        total = static(shape(src)[-1])
        start = node.args[2] if len(node.args) > 2 else 0
        stop = node.args[3] if len(node.args) > 3 else total
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1 or not isinstance(start, int) or not isinstance(stop, int):
            return None
        return src, start, min(stop, total)
    return None


def is_impure(node: fx.Node) -> bool:
    """Impurity for dead-code removal: dead attention and dropout nodes may go, asserts stay."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_function":
        if node.target in _SIDE_EFFECT_OPS:
            return True
        schema = getattr(node.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable)
    return False


def remove_dead_code(gm: fx.GraphModule) -> None:
    """Remove dead nodes (sdpa and dropout included) and the attributes nothing reads any more."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            set_attr_delete(gm, name)
    gm.delete_all_unused_submodules()


def set_attr_delete(gm: fx.GraphModule, target: str) -> None:
    """Delete the parameter or buffer ``gm.<target>``."""
    *path, name = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)


def module_label(node: fx.Node) -> str:
    """A readable name of the module a node came from (for messages only)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return f"{node.name} (in {path})"
    return node.name
