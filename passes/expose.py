"""Expose: add internal tensors (layer outputs, typically) to a graph's output dict.

Preserves computation: yes; existing outputs are unchanged, new keys are added.
"""

from __future__ import annotations

from typing import Mapping

from torch import fx

from passes.capture import derive
from passes.errors import DiscoverError


def expose(gm: fx.GraphModule, outputs: Mapping[str, str]) -> fx.GraphModule:
    """A copy of ``gm`` whose output dict also holds ``{key: value of node name}``.

    Typically ``expose(gm, {f"hidden.{i}": n for i, n in enumerate(structure.layer_outputs)})``.
    Shares parameters with ``gm``.
    """
    graph = fx.Graph()
    result = graph.graph_copy(gm.graph, {})
    if not isinstance(result, dict):
        raise DiscoverError("expose needs a graph from passes.capture (a dict of outputs)")
    nodes = {n.name: n for n in graph.nodes}
    clash = sorted(set(outputs) & set(result))
    if clash:
        raise DiscoverError(f"outputs {clash} already exist; pick other keys")
    missing = sorted(name for name in outputs.values() if name not in nodes)
    if missing:
        raise DiscoverError(f"nodes {missing} are not in the graph")
    graph.output({**result, **{key: nodes[name] for key, name in outputs.items()}})
    return derive(gm, graph)
