"""Capture: a model and example inputs -> a plain, standalone GraphModule.

The graph is produced by ``torch.export`` (non-strict) with dynamic batch and sequence
dimensions, then rebuilt as a plain :class:`torch.fx.GraphModule` that

* is called with the same keyword arguments as the model (``gm(**example_inputs)``),
* returns a dict of tensors keyed by the model's output names (``logits``, ...),
* holds aten ops and its own parameters only, so it runs, pickles and re-exports without
  the library that defined the model,
* computes attention in the (batch, heads, seq, head size) layout: products in a
  (batch * heads) layout are lifted back into it (:mod:`passes.batch_heads`).

Preserves computation: yes (the captured graph equals the model, dropout frozen by mode).
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from passes.batch_heads import lift_batch_heads
from passes.contracts import contract, seeded_call
from passes.errors import CaptureError, InvalidInputsError

#: Attribute names that every module returned by the passes carries.
EXAMPLE_INPUTS_ATTR = "grainfx_example_inputs"
OUTPUT_NAMES_ATTR = "grainfx_output_names"


def check_inputs(example_inputs: object) -> dict[str, torch.Tensor]:
    """Validate that ``example_inputs`` is a non-empty dict of tensors; return it as a dict."""
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise InvalidInputsError(
            f"example_inputs must be a non-empty dict of tensors keyed by the model's argument "
            f"names, got {type(example_inputs).__name__}; pass e.g. "
            f"dict(tokenizer(texts, return_tensors='pt'))"
        )
    bad = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InvalidInputsError(
            f"example_inputs[{bad[0]!r}] is not a tensor; drop non-tensor entries or set them "
            f"on the model's config instead"
        )
    return dict(example_inputs)


def dynamic_shapes_for(inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, object]]:
    """Batch (dim 0) of every input, and sequence (dim 1) of 2-D inputs, are dynamic."""
    spec = {}
    for name, t in inputs.items():
        dims = {}
        if t.dim() >= 1:
            dims[0] = Dim.AUTO
        if t.dim() == 2:
            dims[1] = Dim.AUTO
        spec[name] = dims
    return spec


def _widen(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export specializes a size of 1: repeat every dynamic dimension of size 1 to size 2."""
    widened = {}
    for name, t in inputs.items():
        for dim in dynamic_shapes_for({name: t})[name]:
            if t.shape[dim] == 1:
                t = torch.cat([t, t], dim=dim)
        widened[name] = t
    return widened


def output_names(outputs: object) -> list[str]:
    """Names of the flat tensor outputs of a model call, in pytree order."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    leaves = pytree.tree_flatten_with_path(outputs)[0]
    names = []
    for path, _ in leaves:
        parts = []
        for key in path:
            part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
            parts.append(str(part))
        names.append(".".join(parts) or "output")
    return names


def _plain_graph_module(
    exported: fx.GraphModule, inputs: dict[str, torch.Tensor], names: list[str]
) -> fx.GraphModule:
    """Rebuild export's module as a plain GraphModule: kwargs in, dict of tensors out."""
    src = exported.graph
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in src.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, inputs, strict=False):
        new = graph.placeholder(name)
        new.meta = dict(node.meta)
        env[node] = new
    for node in src.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "output":
            flat = pytree.tree_leaves(node.args[0])
            if len(flat) != len(names):
                raise CaptureError(
                    f"the exported graph has {len(flat)} outputs but the model returned "
                    f"{len(names)} tensors; return only tensors from forward"
                )
            graph.output({name: env[n] for name, n in zip(names, flat, strict=True)})
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(exported, graph, class_name="GraphModule")
    gm.graph.lint()
    setattr(gm, EXAMPLE_INPUTS_ATTR, {k: v.detach().clone() for k, v in inputs.items()})
    setattr(gm, OUTPUT_NAMES_ATTR, list(names))
    return gm


def _export(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> fx.GraphModule:
    try:
        ep = torch.export.export(
            model, (), inputs, strict=False, dynamic_shapes=dynamic_shapes_for(inputs)
        )
    except Exception as exc:  # torch.export raises many unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"torch.export could not trace {type(model).__name__}: {first}. The model's forward "
            f"must be traceable by torch.export (no data-dependent Python control flow, tensor "
            f"inputs only); see the cause below, or simplify forward and retry"
        ) from exc
    return ep.module()


def _prepared_copy(model: torch.nn.Module) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputsError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clone = copy.deepcopy(model)
    for module in clone.modules():  # T5's decoder stack holds a config of its own
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False  # a KV cache is not a tensor output: run without it
    return clone


def _capture_copy(
    clone: torch.nn.Module, inputs: dict[str, torch.Tensor], train: bool
) -> fx.GraphModule:
    clone.train(train)
    export_inputs = _widen(inputs)
    try:
        with torch.no_grad():
            names = output_names(clone.eval()(**export_inputs))
    except Exception as exc:
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        raise CaptureError(
            f"{type(clone).__name__} failed on the example inputs {shapes}: {exc}".splitlines()[0]
        ) from exc
    clone.train(train)
    gm = _plain_graph_module(_export(clone, export_inputs), inputs, names)
    lift_batch_heads(gm)
    return gm


def _is_captured(gm: object) -> str | None:
    """What a captured graph carries: a valid graph, its example inputs and output names."""
    if not isinstance(gm, fx.GraphModule):
        return f"it returned a {type(gm).__name__}, not a GraphModule"
    if not hasattr(gm, EXAMPLE_INPUTS_ATTR) or not hasattr(gm, OUTPUT_NAMES_ATTR):
        return "the graph lacks its example inputs or output names"
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001 (lint raises plain errors)
        return f"the graph does not lint: {exc}".splitlines()[0]
    return None


def _model_and_graph(
    model: torch.nn.Module, gm: fx.GraphModule, train: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The outputs of (a copy of) ``model`` and of ``gm`` on the example inputs; none in train
    mode, where dropout makes every call differ."""
    if train:
        return {}, {}
    inputs = getattr(gm, EXAMPLE_INPUTS_ATTR)
    outputs = seeded_call(_prepared_copy(model).eval(), inputs)
    named = dict(zip(output_names(outputs), pytree.tree_leaves(outputs), strict=True))
    return named, seeded_call(gm, inputs)


@contract(
    preserves_computation=True,
    ensures=lambda args, gm: _is_captured(gm),
    compare=lambda args, gm: _model_and_graph(args["model"], gm, args["train"]),
)
def capture(
    model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], *, train: bool = False
) -> fx.GraphModule:
    """Capture ``model`` into a plain GraphModule with dynamic batch and sequence.

    Args:
        model: any module torch.export can trace (a Hugging Face model, typically). It is
            copied first and never modified; a KV cache is turned off on the copy.
        example_inputs: keyword arguments of one forward call, a dict of tensors.
        train: capture with dropout live (``model.train()``) instead of in eval mode.

    Returns:
        A GraphModule called as ``gm(**example_inputs)`` that returns a dict of tensors.

    Raises:
        InvalidInputsError: ``example_inputs`` is not a dict of tensors.
        CaptureError: torch.export failed (its error is the ``__cause__``).
    """
    inputs = check_inputs(example_inputs)
    return _capture_copy(_prepared_copy(model), inputs, train)


def _is_pair(pair: tuple[fx.GraphModule, fx.GraphModule]) -> str | None:
    """Two captured graphs on one set of parameters."""
    problem = _is_captured(pair[0]) or _is_captured(pair[1])
    shared = {id(p) for p in pair[0].parameters()} == {id(p) for p in pair[1].parameters()}
    return problem or (None if shared else "the two graphs do not share their parameters")


@contract(
    preserves_computation=True,
    ensures=lambda args, pair: _is_pair(pair),
    compare=lambda args, pair: _model_and_graph(args["model"], pair[0], train=False),
)
def capture_pair(
    model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor]
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Capture an eval-mode and a train-mode graph that share one set of parameters.

    Training the train-mode graph updates the eval-mode one; ``model`` is left untouched.
    Returns ``(eval_gm, train_gm)``.
    """
    inputs = check_inputs(example_inputs)
    clone = _prepared_copy(model)
    eval_gm = _capture_copy(clone, inputs, train=False)
    train_gm = _capture_copy(clone, inputs, train=True)
    return eval_gm, train_gm


def derive(
    gm: fx.GraphModule, graph: fx.Graph, root: torch.nn.Module | None = None
) -> fx.GraphModule:
    """A new GraphModule on ``graph`` with the attributes of ``root`` (default ``gm``) and
    ``gm``'s grainfx metadata (example inputs, output names)."""
    new = fx.GraphModule(gm if root is None else root, graph, class_name="GraphModule")
    copy_metadata(gm, new)
    return new


def copy_metadata(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Carry grainfx's metadata attributes (example inputs, output names) from src to dst."""
    for attr in (EXAMPLE_INPUTS_ATTR, OUTPUT_NAMES_ATTR):
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
