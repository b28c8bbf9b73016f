"""The graph after each pass, to print and compare: captured, instrumented, compact.

stages = grainfx.stages(model, batch, masks=result.masks)
print(stages)                         # one row per pass: nodes, key ops, parameters
print(stages.code("instrumented"))    # the graph as Python code
print(stages.diff("captured", "instrumented"))
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import fx

import passes
from grainfx import buckets

#: Operators counted in the summary: where the passes change the graph.
KEY_OPS = {
    "linear": "linear",
    "matmul": "matmul",
    "scaled_dot_product_attention": "sdpa",
    "softmax": "softmax",
    "mul": "mul",
    "index_select": "gather",
    "cat": "cat",
}


@dataclass
class Stages:
    """The GraphModule after each pass, in order, and what discover found."""

    graphs: dict[str, fx.GraphModule]
    structure: passes.Structure

    def code(self, stage: str) -> str:
        """The graph of ``stage`` as readable Python (``GraphModule.print_readable``)."""
        return self._graph(stage).print_readable(print_output=False)

    def diff(self, before: str, after: str, context: int = 1) -> str:
        """A unified diff of the code of two stages: what a pass changed."""
        a, b = self._graph(before).code, self._graph(after).code
        return "".join(
            difflib.unified_diff(a.splitlines(True), b.splitlines(True), before, after, n=context)
        )

    def summary(self) -> list[dict]:
        """Per stage: graph nodes, counts of the key operators, parameters."""
        rows = []
        for name, gm in self.graphs.items():
            ops: Counter[str] = Counter()
            for node in gm.graph.nodes:
                if node.op == "call_function":
                    base = getattr(node.target, "__name__", str(node.target)).split(".")[0]
                    if base in KEY_OPS:
                        ops[KEY_OPS[base]] += 1
            rows.append(
                {
                    "stage": name,
                    "nodes": len(gm.graph.nodes),
                    "ops": dict(ops),
                    "parameters": sum(p.numel() for p in gm.parameters()),
                }
            )
        return rows

    def _graph(self, stage: str) -> fx.GraphModule:
        if stage not in self.graphs:
            raise KeyError(f"no stage {stage!r}: the stages are {list(self.graphs)}")
        return self.graphs[stage]

    def __str__(self) -> str:
        lines = [f"{'stage':<13} {'nodes':>6} {'parameters':>11}  key operators"]
        for row in self.summary():
            ops = ", ".join(f"{k} {v}" for k, v in sorted(row["ops"].items()))
            lines.append(f"{row['stage']:<13} {row['nodes']:>6} {row['parameters']:>11,}  {ops}")
        return "\n".join(lines)


def stages(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Stages:
    """Run the passes on ``model`` and keep the graph after each one.

    ``inputs``: one batch of model inputs (labels ignored). ``masks``: binary masks to
    rewrite with (for example ``CompressionResult.masks``); default all ones, which keeps
    everything. The model is copied, never modified.
    """
    batch = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
    captured = passes.capture(model, batch)
    structure = passes.discover(captured)
    instrumented = passes.instrument(captured, structure)
    if masks is not None:
        passes.set_masks(instrumented, masks)
    compact = buckets.rewrite(instrumented, structure)
    return Stages(
        {"captured": captured, "instrumented": instrumented, "compact": compact}, structure
    )
