"""Small helpers shared by the passes: op sets, projection matching, shapes, dead-code removal."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, cast

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
#: Casts and aliases: identity on float32 graphs (the passthrough ops less dropout).
#: Adds, in place or not (``scores += bias``, Falcon's ``mlp_output += attention_output``).
ADD_OPS = {aten.add.Tensor, aten.add_.Tensor}
CAST_OPS = (PASSTHROUGH_OPS - {aten.dropout.default}) | {aten.alias.default}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
#: Ops that are kept by dead-code removal even when nothing reads them.
_SIDE_EFFECT_OPS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def as_node(arg: fx.node.Argument) -> fx.Node:
    """``arg`` where the pattern being matched makes it a node.

    fx types every argument as any ``Argument``; this says which ones the passes read as nodes
    (a cast for the type checker: nothing is checked at run time).
    """
    return cast(fx.Node, arg)


def arg_node(node: fx.Node, index: int) -> fx.Node:
    """``node.args[index]`` where the pattern being matched makes it a node (see ``as_node``)."""
    return cast(fx.Node, node.args[index])


def arg_nodes(node: fx.Node, index: int) -> list[fx.Node]:
    """``node.args[index]`` where the pattern makes it a list of nodes (``cat``, ``stack``)."""
    return cast(list[fx.Node], node.args[index])


def is_op(node: fx.Node, ops: Iterable) -> bool:
    """True when ``node`` calls one of ``ops``."""
    return node.op == "call_function" and node.target in set(ops)


def shape(node: fx.Node) -> tuple | None:
    """The (possibly symbolic) shape recorded by export on ``node``, or None."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def static(dim: object) -> int | None:
    """``dim`` as an int when it is static, else None."""
    return dim if isinstance(dim, int) else None


def live_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than metadata asserts."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def through_passthrough(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Follow ``node`` through its only live user while that user is a passthrough op:
    (the last node passed, the first other user). None where a node on the way has other
    than one live user."""
    cur = node
    while True:
        users = live_users(cur)
        if len(users) != 1:
            return None
        if not is_op(users[0], PASSTHROUGH_OPS):
            return cur, users[0]
        cur = users[0]


def attr_tensor(gm: fx.GraphModule, node_or_target: fx.Node | str) -> torch.Tensor:
    """The tensor behind a get_attr node (or its target string)."""
    target = str(node_or_target.target) if isinstance(node_or_target, fx.Node) else node_or_target
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: fx.GraphModule, target: str, value: object) -> None:
    """Set ``gm.<target>`` (dotted), replacing a parameter or buffer of the same name."""
    *path, name = target.split(".")
    owner: torch.nn.Module = gm
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
    within the stored weight, or ``rows`` lists them where a fused projection interleaves its
    pieces (GPT-NeoX's per-head q, k, v).
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
    rows: tuple[int, ...] | None = None

    @property
    def out_features(self) -> int:
        return len(self.rows) if self.rows is not None else self.stop - self.start

    def output_rows(self) -> list[int]:
        """This projection's output features as indices of the stored weight's outputs."""
        return list(self.rows) if self.rows is not None else list(range(self.start, self.stop))

    def linear_weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """This projection's weight in nn.Linear layout (out, in), detached."""
        w = attr_tensor(gm, self.weight).detach()
        w = w.t() if self.transposed else w
        return w[self.output_rows()]

    def linear_bias(self, gm: fx.GraphModule) -> torch.Tensor | None:
        """This projection's bias (out,), detached, or None."""
        if self.bias is None:
            return None
        return attr_tensor(gm, self.bias).detach()[self.output_rows()]

    def params_per_output(self) -> int:
        """Parameters that one output feature (a weight row and its bias) holds."""
        return self.in_features + (1 if self.bias is not None else 0)

    def with_rows(self, node: str, rows: list[int]) -> "Projection":
        """This projection restricted to ``rows`` (indices into its output features)."""
        full = self.output_rows()
        picked = [full[r] for r in rows]
        if picked == list(range(picked[0], picked[0] + len(picked))):
            return Projection(
                node,
                self.input,
                self.input_user,
                self.weight,
                self.bias,
                self.transposed,
                picked[0],
                picked[0] + len(picked),
                self.in_features,
            )
        return Projection(
            node,
            self.input,
            self.input_user,
            self.weight,
            self.bias,
            self.transposed,
            0,
            0,
            self.in_features,
            tuple(picked),
        )


def _get_attr(node: fx.node.Argument) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


#: A 2-d weight transposed for ``x @ W.T``.
_WEIGHT_T = {aten.numpy_T.default, aten.t.default, aten.permute.default}


def _plain_projection(
    node: fx.Node, weight: str, bias: str | None, out: Sequence[int]
) -> Projection:
    """``node`` as a whole projection of its first argument by a weight stored (out, in)."""
    return Projection(
        node.name,
        arg_node(node, 0).name,
        node.name,
        weight,
        bias,
        False,
        0,
        int(out[0]),
        int(out[1]),
    )


def match_projection(node: fx.Node) -> Projection | None:
    """The projection whose output is ``node``: ``aten.linear``, ``x @ W.T`` or Conv1D's
    view-addmm-view."""
    if is_op(node, [aten.linear.default]):
        weight = _get_attr(node.args[1])
        bias = _get_attr(node.args[2]) if len(node.args) > 2 else None
        if weight is None or (len(node.args) > 2 and node.args[2] is not None and bias is None):
            return None
        return _plain_projection(node, weight, bias, arg_node(node, 1).meta["val"].shape)
    if is_op(node, [aten.add.Tensor]) and is_op(arg_node(node, 0), [aten.matmul.default]):
        matmul = arg_node(node, 0)
        inner = match_projection(matmul)  # x @ W.T + b (FalconLinear with a bias)
        bias = _get_attr(node.args[1])
        if inner is None or bias is None or len(live_users(matmul)) != 1:
            return None
        if tuple(arg_node(node, 1).meta["val"].shape) != (inner.stop,):
            return None
        return dataclasses.replace(inner, node=node.name, bias=bias)
    if is_op(node, [aten.matmul.default]) and is_op(arg_node(node, 1), _WEIGHT_T):
        weight_t = arg_node(node, 1)
        weight = _get_attr(weight_t.args[0])  # x @ W.T (Falcon's FalconLinear)
        if weight is None:
            return None
        out = arg_node(weight_t, 0).meta["val"].shape
        if len(out) != 2 or (
            is_op(weight_t, [aten.permute.default])
            and list(cast(Sequence[int], weight_t.args[1])) != [1, 0]
        ):
            return None
        return _plain_projection(node, weight, None, out)
    if is_op(node, [aten.view.default, aten.reshape.default]):
        mm = arg_node(node, 0)
        if is_op(mm, [aten.addmm.default, aten.mm.default]):
            if mm.target is aten.addmm.default:
                bias, flat, weight = _get_attr(mm.args[0]), arg_node(mm, 1), _get_attr(mm.args[2])
                if bias is None:
                    return None
            else:
                bias, flat, weight = None, arg_node(mm, 0), _get_attr(mm.args[1])
            if weight is None or not is_op(flat, [aten.view.default, aten.reshape.default]):
                return None
            w = arg_node(mm, -1).meta["val"].shape
            return Projection(
                node.name,
                arg_node(flat, 0).name,
                flat.name,
                weight,
                bias,
                True,
                0,
                int(w[1]),
                int(w[0]),
            )
    return None


def match_projection_from_input(node: fx.Node) -> Projection | None:
    """The projection that reads ``node`` (its only live user, or that user's flattening view)."""
    users = live_users(node)
    if len(users) != 1:
        return None
    user = users[0]
    if is_op(user, [aten.linear.default, aten.matmul.default]) and user.args[0] is node:
        outs = live_users(user)
        biased = match_projection(outs[0]) if len(outs) == 1 else None  # x @ W.T + b
        return biased if biased is not None else match_projection(user)
    if is_op(user, [aten.view.default, aten.reshape.default]):
        mm_users = live_users(user)
        if len(mm_users) == 1 and is_op(mm_users[0], [aten.addmm.default, aten.mm.default]):
            outs = live_users(mm_users[0])
            if len(outs) == 1:
                return match_projection(outs[0])
    return None


def is_layout(node: fx.Node) -> bool:
    """True for ops that only move features around: head splits and merges, splits of fused
    projections (split / chunk / unbind and their getitem), slices, constant indexing, and
    expansions (key/value heads repeated for their query heads)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and is_op(node.args[0], SPLIT_OPS)
    if node.target is aten.index.Tensor:
        return _constant_index(node)
    return (
        node.target in LAYOUT_OPS
        or node.target in SPLIT_OPS
        or node.target
        in (
            aten.slice.Tensor,
            aten.alias.default,
            aten.select.int,
            aten.squeeze.dim,
            aten.unsqueeze.default,
            aten.flatten.using_ints,
            aten.expand.default,
            aten.broadcast_to.default,
        )
    )


def _constant(node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a get_attr node (or its ``lift_fresh_copy``), else None."""
    if is_op(node, [aten.lift_fresh_copy.default]):
        node = arg_node(node, 0)
    if node.op != "get_attr" or node.graph.owning_module is None:
        return None
    value = attr_tensor(node.graph.owning_module, node)
    return value if isinstance(value, torch.Tensor) else None


def _constant_index(node: fx.Node) -> bool:
    """``x[..., idx, ...]`` with constant integer indices (Falcon's ``fused[..., [-2], :]``)."""
    for i in cast(Sequence[fx.node.Argument], node.args[1]):  # aten.index: one per dim or None
        if i is None:
            continue
        constant = _constant(i) if isinstance(i, fx.Node) else None
        if constant is None or constant.is_floating_point():
            return False
    return True


def feature_rows(source: fx.Node, chain: list[fx.Node]) -> list[int] | None:
    """Which features of ``source`` (features last) end up, in order, in ``chain[-1]``.

    ``chain`` lists layout ops from ``source`` on; each is applied to the result of the one
    before (ops between them that keep every feature in place, a cast or a rotary embedding,
    are left out). They are replayed on the feature indices (symbolic batch and sequence sizes
    set to 1) at the first position, so a head split, a fused split, a transpose or an unbind
    gives the index of each (head, dim) of the result, flattened. None when the chain cannot be
    replayed.
    """
    dims = shape(source)
    if dims is None or static(dims[-1]) is None:
        return None
    sizes = [static(d) or 1 for d in dims]
    features = sizes[-1]
    # entry = feature + features * position: the entries of position 0 are the answer
    value: object = torch.arange(math.prod(sizes)).reshape(sizes)

    def arg(a: fx.node.Argument) -> fx.node.Argument:
        if isinstance(a, fx.Node):  # a constant index, or a symbolic batch or sequence size
            constant = _constant(a)
            return 1 if constant is None else constant
        return a

    try:
        for node in chain:
            rest = fx.node.map_aggregate(node.args[1:], arg)
            op = cast(Callable[..., object], node.target)  # layout ops: call_function nodes
            value = op(value, *rest, **fx.node.map_aggregate(node.kwargs, arg))
    except Exception:  # noqa: BLE001 - a chain that does not replay is no head layout
        return None
    if not isinstance(value, torch.Tensor):
        return None
    return [int(v) for v in value.flatten() if v < features]


def is_impure(node: fx.Node) -> bool:
    """Impurity for dead-code removal: dead attention and dropout nodes may go, asserts and
    writes to inputs, parameters or tensors read elsewhere stay."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_function":
        if node.target in _SIDE_EFFECT_OPS:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            return False
        written = [
            a
            for a, spec in zip(node.args, schema.arguments, strict=False)
            if spec.alias_info is not None and spec.alias_info.is_write
        ]
        # an in-place op on an intermediate that nothing else reads (``scores += bias`` of a
        # dead attention block) may go with it
        return not written or not all(
            isinstance(a, fx.Node) and a.op == "call_function" and set(a.users) == {node}
            for a in written
        )
    return False


def ancestors(
    starts: Iterable[fx.Node], cut: set[tuple[fx.Node, fx.Node]] | None = None
) -> set[fx.Node]:
    """``starts`` and every node they read, directly or not; an edge (reader, input) in
    ``cut`` is not followed."""
    stack = list(starts)
    seen = set(stack)
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            if arg not in seen and (cut is None or (node, arg) not in cut):
                seen.add(arg)
                stack.append(arg)
    return seen


def live_attrs(gm: fx.GraphModule) -> set[str]:
    """The attributes that the graph's output (or an impure op) reads: what
    :func:`remove_dead_code` keeps."""
    live = ancestors(n for n in gm.graph.nodes if is_impure(n))
    return {str(n.target) for n in live if n.op == "get_attr"}


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
