"""The report of a compress run: what was kept, parameters before and after, how it went."""

from __future__ import annotations

from typing import Mapping

import passes
from grainfx.config import GrainConfig
from grainfx.trainer import History
from passes.record import KeptStructure


def build_report(
    kept: KeptStructure,
    structure: passes.Structure,
    history: History,
    target_density: float,
    config: GrainConfig,
    original_params: int,
) -> dict:
    """JSON-ready report from the compact module's kept structure and the training history.

    ``original_params``: parameters of the model given to compress (before any embedding
    factorization), the "before" of the total.
    """
    outside = structure.total_params - structure.unit_params
    encoder_after = kept.unit_parameters
    layers = []
    for layer in kept.layers:
        layers.append(
            {
                "layer": layer.layer,
                "heads": len(layer.heads),
                "query_units": [h.query for h in layer.heads],
                "value_units": [h.value for h in layer.heads],
                "ffn": layer.ffn,
                "heads_dense": layer.heads_dense,
                "head_dim": layer.head_dim,
                "ffn_dense": layer.ffn_dense,
            }
        )
    return {
        "target_density": target_density,
        "density": encoder_after / structure.unit_params,
        "parameters": {
            "encoder_before": structure.unit_params,
            "encoder_after": encoder_after,
            "outside_encoder": outside,
            "total_before": original_params,
            "total_after": kept.parameters,
        },
        "coverage": {
            "prunable_share": structure.unit_params / structure.total_params,
            "uncovered": list(structure.uncovered),
        },
        "layers": layers,
        "steps": history.steps,
        "skipped_steps": history.skipped,
        "final_kd_loss": history.kd_loss[-1] if history.kd_loss else None,
        "final_hidden_loss": history.hidden_loss[-1] if history.hidden_loss else None,
        "kd_loss": history.kd_loss,
        "hidden_loss": history.hidden_loss,
        "density_per_step": history.density,
        "seconds": history.seconds,
        "config": config.to_dict(),
    }


def format_report(report: Mapping) -> str:
    """A Markdown summary: parameters, then one row per layer."""
    p = report["parameters"]
    lines = [
        f"density {report['density']:.2%} (target {report['target_density']:.2%}), "
        f"{report['steps']} steps in {report['seconds']:.0f} s",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| encoder (prunable) parameters | {p['encoder_before']:,} | {p['encoder_after']:,} |",
        f"| total parameters | {p['total_before']:,} | {p['total_after']:,} |",
        "",
        _coverage_line(report["coverage"]["prunable_share"], report["coverage"]["uncovered"]),
        "",
        "| layer | heads | query units per head | value units per head | FFN width |",
        "|---:|---:|---|---|---:|",
    ]
    for layer in report["layers"]:
        lines.append(
            f"| {layer['layer']} | {layer['heads']} | "
            f"{' '.join(map(str, layer['query_units'])) or '-'} | "
            f"{' '.join(map(str, layer['value_units'])) or '-'} | {layer['ffn']} |"
        )
    return "\n".join(lines)


def _coverage_line(share: float, uncovered: list[str]) -> str:
    line = f"coverage: {share:.0%} of the parameters are in prunable units"
    if uncovered:
        line += f"; not covered inside the layers (kept whole): {', '.join(uncovered)}"
    return line
