"""Inspection of compact models: what was kept, per layer, with parameters and FLOPs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

import passes
from passes.record import KeptStructure
from passes.rewrite import KEPT_ATTR


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a compact model: kept heads with their query / value units, FFN width,
    and forward FLOPs per sequence (kept and dense). ``query_less`` counts the heads without
    query units that run without scores, as the mean of their values; ``bucket`` is the
    granularity at which its other heads share attention calls (None: no such head, or a
    model rewritten before it was recorded)."""

    layer: int
    heads: int
    heads_dense: int
    query_units: tuple[int, ...]
    value_units: tuple[int, ...]
    head_index: tuple[int, ...]
    head_dim: int
    ffn: int
    ffn_dense: int
    flops: float
    flops_dense: float
    query_less: int = 0
    bucket: int | None = None


def _flops(hidden: int, seq: int, q: int, v: int, ffn: int, v_mean: int = 0) -> float:
    """Multiply-adds x 2 of one layer for one sequence of ``seq`` tokens; ``v_mean`` of the
    ``v`` value units belong to heads that average their values without scores."""
    projections = 2 * seq * hidden * (2 * q + 2 * v)
    scores = 2 * seq * seq * (q + v - v_mean) + 2 * seq * v_mean
    return projections + scores + 2 * seq * hidden * 2 * ffn


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect` found; ``str()`` is a table, notebooks render it as HTML."""

    layers: tuple[LayerInfo, ...]
    hidden: int
    seq: int
    parameters: int
    parameters_dense: int
    density: float
    prunable_share: float = 0.0
    uncovered: tuple[str, ...] = ()

    @property
    def flops(self) -> float:
        return sum(layer.flops for layer in self.layers)

    @property
    def flops_dense(self) -> float:
        return sum(layer.flops_dense for layer in self.layers)

    def rows(self) -> list[dict]:
        """The per-layer table as plain data."""
        return [
            {
                "layer": x.layer,
                "heads": f"{x.heads}/{x.heads_dense}",
                "query-less (mean)": x.query_less or "-",
                "bucket": x.bucket or "-",
                "query units": " ".join(map(str, x.query_units)) or "-",
                "value units": " ".join(map(str, x.value_units)) or "-",
                "ffn": f"{x.ffn}/{x.ffn_dense}",
                "GFLOPs": f"{x.flops / 1e9:.3f}",
            }
            for x in self.layers
        ]

    def __str__(self) -> str:
        rows = self.rows()
        cols = list(rows[0]) if rows else []
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        lines = [
            f"density {self.density:.2%} of the encoder; parameters {self.parameters:,} "
            f"(dense {self.parameters_dense:,}); {self.flops / 1e9:.3f} GFLOPs per "
            f"sequence of {self.seq} (dense {self.flops_dense / 1e9:.3f}, "
            f"{self.flops_dense / max(self.flops, 1):.1f}x fewer)",
            f"coverage: {self.prunable_share:.0%} of the dense parameters were in "
            f"prunable units"
            + (
                f"; not covered inside the layers (kept whole): {', '.join(self.uncovered)}"
                if self.uncovered
                else ""
            ),
            "  ".join(c.ljust(widths[c]) for c in cols),
        ]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self.rows()
        head = "".join(f"<th>{c}</th>" for c in rows[0]) if rows else ""
        body = "".join(
            "<tr>" + "".join(f"<td>{v}</td>" for v in r.values()) + "</tr>" for r in rows
        )
        return f"<p>{str(self).splitlines()[0]}</p><table><tr>{head}</tr>{body}</table>"

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw the kept structure: query and value units per layer and head, FFN widths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        heads = max(x.heads_dense for x in self.layers)
        grids = {
            "query": torch.zeros(len(self.layers), heads),
            "value": torch.zeros(len(self.layers), heads),
        }
        for i, layer in enumerate(self.layers):
            for h, q, v in zip(layer.head_index, layer.query_units, layer.value_units, strict=True):
                grids["query"][i, h], grids["value"][i, h] = q, v
        fig, axes = plt.subplots(
            1,
            3,
            figsize=(13, 0.5 * len(self.layers) + 2.2),
            gridspec_kw={"width_ratios": [heads, heads, 6]},
        )
        vmax = max(x.head_dim for x in self.layers)
        for ax, (name, grid) in zip(axes, grids.items(), strict=False):
            image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            ax.set_title(f"{name} units per head")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(heads))
            ax.set_yticks(range(len(self.layers)))
            fig.colorbar(image, ax=ax, fraction=0.046)
        ffn = axes[2]
        ys = range(len(self.layers))
        ffn.barh(ys, [x.ffn_dense for x in self.layers], color="#dddddd", label="dense")
        ffn.barh(ys, [x.ffn for x in self.layers], color="#2a788e", label="kept")
        ffn.invert_yaxis()
        ffn.set_title("FFN width")
        ffn.set_yticks(list(ys))
        ffn.legend(loc="lower right")
        fig.suptitle(
            f"kept structure: {self.density:.1%} of the encoder, {self.parameters:,} parameters"
        )
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def inspect(model: torch.nn.Module | str | os.PathLike, seq: int = 128) -> Inspection:
    """The kept structure of a compact model (a module from compress / rewrite, or a .pt2)."""
    module = passes.load(model) if isinstance(model, (str, os.PathLike)) else model
    kept = getattr(module, KEPT_ATTR, None)
    if not isinstance(kept, KeptStructure):
        raise passes.LoadError(
            "this module carries no kept structure: inspect modules made by "
            "grainfx.compress or passes.rewrite, or their .pt2 files"
        )
    hidden = kept.hidden
    layers = []
    for layer in kept.layers:
        heads = layer.heads
        q = tuple(h.query for h in heads)
        v = tuple(h.value for h in heads)
        mean = [h.value for h in heads if h.query_less_mean]
        d, dense_heads = layer.head_dim or 0, layer.heads_dense or 0
        ffn, ffn_dense = layer.ffn or 0, layer.ffn_dense or 0
        layers.append(
            LayerInfo(
                layer=layer.layer,
                heads=len(heads),
                heads_dense=dense_heads,
                query_units=q,
                value_units=v,
                head_index=tuple(h.head for h in heads),
                head_dim=d,
                ffn=ffn,
                ffn_dense=ffn_dense,
                query_less=len(mean),
                bucket=layer.bucket,
                flops=_flops(hidden, seq, sum(q), sum(v), ffn, sum(mean)),
                flops_dense=_flops(hidden, seq, dense_heads * d, dense_heads * d, ffn_dense),
            )
        )
    return Inspection(
        layers=tuple(layers),
        hidden=hidden,
        seq=seq,
        parameters=kept.parameters,
        parameters_dense=kept.parameters_dense,
        density=kept.density,
        prunable_share=kept.unit_parameters_dense / max(kept.parameters_dense, 1),
        uncovered=kept.uncovered,
    )
