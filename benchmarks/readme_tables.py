"""Regenerate the README's benchmark sections (and plots) from benchmarks/results/*.json.

Numbers in the README come from these files only:

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import architectures, evidence  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BUCKETS = ("bucket=1", "bucket=4", "bucket=8", "bucket=16", "bucket=64", "bucket=auto")


def _kept_rows(records: dict, threads: int, mode: str, model: str = "bert") -> list[dict]:
    rows = [
        r
        for r in records.values()
        if r["threads"] == threads and r["mode"] == mode and r.get("model", "bert") == model
    ]
    order = {"concentrated": 0, "spread": 1, "unequal": 2}
    return sorted(rows, key=lambda r: (-r["kept"], order.get(r["pattern"], 9)))


def _best(row: dict) -> tuple[str, float]:
    compact = {k: v for k, v in row["speedup"].items() if k.startswith("bucket")}
    name = max(compact, key=compact.get)
    return name, compact[name]


def _present(rows: list[dict]) -> list[str]:
    """The bucket columns any of ``rows`` measured, in :data:`BUCKETS` order."""
    return [b for b in BUCKETS if any(b in r["speedup"] for r in rows)]


def _cell(speedup: dict, name: str) -> str:
    return f"{speedup[name]:.2f}x" if name in speedup else "-"


def rewrite_speed_section(data: dict) -> str:
    records, meta = data["records"], data["meta"]
    shape, mach = meta["shape"], meta["machine"]
    lines = [
        f"Dense vs compact, BERT-base size (hidden {shape['hidden']}, {shape['heads']} heads, "
        f"FFN {shape['ffn']}, {shape['layers']} layers, random weights), batch {shape['batch']}, "
        f"sequence {shape['seq']}; {mach['processor']}, torch {mach['torch']}; interleaved runs, "
        f"median of {meta['reps']}. *limit*: a uniform model doing the same kept work in the "
        f"most regular shape (one head of the kept size, FFN of the kept width per layer). "
        f"Patterns: *concentrated* = the kept units fill few heads, *spread* = every head keeps "
        f"the same few dims, *unequal* = units scattered at random (heads of unequal sizes). "
        f"Produced by `python benchmarks/rewrite_speed.py`.",
        "",
    ]
    for threads in sorted({r["threads"] for r in records.values()}):
        rows = _kept_rows(records, threads, "eager")
        if not rows:
            continue
        present = _present(rows)
        unmerged = [k for k in rows[0]["speedup"] if k.endswith("unmerged")]
        lines += [
            f"**Eager, {threads} thread{'s' if threads > 1 else ''}** (speedup over "
            f"dense, per bucket size)",
            "",
            "| kept | pattern | FLOPs ratio | limit | "
            + " | ".join(present + unmerged)
            + " | best / limit |",
            "|---:|---|---:|---:|" + "---:|" * (len(present) + len(unmerged)) + "---:|",
        ]
        for r in rows:
            _, best = _best(r)
            cells = [_cell(r["speedup"], b) for b in present + unmerged]
            lines.append(
                f"| {r['kept']:.0%} | {r['pattern']} | {r['flops_ratio']:.1f}x | "
                f"{r['uniform_speedup']:.2f}x | "
                + " | ".join(cells)
                + f" | {best / r['uniform_speedup']:.0%} |"
            )
        lines.append("")
    for threads in sorted({r["threads"] for r in records.values()}):
        rows = _kept_rows(records, threads, "compiled")
        if not rows:
            continue
        present = [b for b in BUCKETS if b in rows[0]["speedup"]]
        lines += [
            f"**torch.compile, {threads} thread{'s' if threads > 1 else ''}** (speedup "
            f"over compiled dense; compile time of the first call)",
            "",
            "| kept | pattern | limit | " + " | ".join(present) + " | best / limit | "
            "compile: dense | " + " | ".join(f"compile: {b}" for b in present) + " |",
            "|---:|---|---:|" + "---:|" * (2 * len(present) + 2),
        ]
        for r in rows:
            _, best = _best(r)
            cs = r["compile_seconds"]
            lines.append(
                f"| {r['kept']:.0%} | {r['pattern']} | {r['uniform_speedup']:.2f}x | "
                + " | ".join(f"{r['speedup'][b]:.2f}x" for b in present)
                + f" | {best / r['uniform_speedup']:.0%} | {cs['dense']:.0f} s | "
                + " | ".join(f"{cs[b]:.0f} s" for b in present)
                + " |"
            )
        lines.append("")
    lines += llama_speed_lines(records)
    if (RESULTS / "rewrite_speed.png").exists():
        lines.append("![rewrite speed](benchmarks/results/rewrite_speed.png)")
    return "\n".join(lines).rstrip()


def llama_speed_lines(records: dict) -> list[str]:
    """The Llama rows, one table per (batch, seq, threads, eager / compiled)."""
    llama = [r for r in records.values() if r.get("model") == "llama"]
    if not llama:
        return []
    s = llama[0]["shape"]
    lines = [
        f"**Llama-shaped model** (RoPE, {s['heads']} query heads in {s['kv_heads']} "
        f"key/value groups of head size {s['head_dim']}, SwiGLU FFN {s['ffn']}, hidden "
        f"{s['hidden']}, {s['layers']} layers, random weights; `--only llama`). *limit*: a "
        f"uniform Llama doing the kept work of the concentrated masks in the most regular "
        f"shape (one key/value group per layer with its kept query heads, FFN of the kept "
        f"width), the same for every pattern of a kept share: spread and unequal masks keep "
        f"somewhat less (see density and FLOPs ratio), so they can pass 100% of it. "
        f"*spread* keeps at least one query head per group.",
        "",
    ]
    order = {"concentrated": 0, "spread": 1, "unequal": 2}
    groups = sorted(
        {(r["shape"]["batch"], r["shape"]["seq"], r["threads"], r["mode"]) for r in llama},
        key=lambda g: (g[3], g[2], -g[0], g[1]),
    )
    for batch, seq, threads, mode in groups:
        rows = sorted(
            (
                r
                for r in llama
                if (r["shape"]["batch"], r["shape"]["seq"], r["threads"], r["mode"])
                == (batch, seq, threads, mode)
            ),
            key=lambda r: (-r["kept"], order.get(r["pattern"], 9)),
        )
        present = [b for b in BUCKETS if b in rows[0]["speedup"]]
        unmerged = [k for k in rows[0]["speedup"] if k.endswith("unmerged")]
        compiled = mode == "compiled"
        lines += [
            f"Batch {batch}, sequence {seq}, {threads} thread{'s' if threads > 1 else ''}, "
            f"{'torch.compile' if compiled else 'eager'} (speedup over dense, per bucket "
            f"size; median of {rows[0]['reps']})",
            "",
            "| kept | pattern | density | FLOPs ratio | limit | "
            + " | ".join(present + unmerged)
            + " | best / limit |"
            + (" compile time (dense, compact) |" if compiled else ""),
            "|---:|---|---:|---:|---:|"
            + "---:|" * (len(present) + len(unmerged))
            + "---:|"
            + ("---:|" if compiled else ""),
        ]
        for r in rows:
            name, best = _best(r)
            cells = [f"{r['speedup'][b]:.2f}x" for b in present + unmerged]
            compile_cell = (
                f" {r['compile_seconds']['dense']:.0f} s, {r['compile_seconds'][name]:.0f} s |"
                if compiled
                else ""
            )
            lines.append(
                f"| {r['kept']:.0%} | {r['pattern']} | {r['density']:.1%} | "
                f"{r['flops_ratio']:.1f}x | {r['uniform_speedup']:.2f}x | "
                + " | ".join(cells)
                + f" | {best / r['uniform_speedup']:.0%} |"
                + compile_cell
            )
        lines.append("")
    return lines


def rewrite_speed_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _kept_rows(data["records"], 1, "eager")
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for pattern, marker in (("concentrated", "o"), ("spread", "s"), ("unequal", "^")):
        pts = sorted((r["kept"], _best(r)[1]) for r in rows if r["pattern"] == pattern)
        if pts:
            ax.plot(
                [k for k, _ in pts], [s for _, s in pts], marker=marker, label=f"compact, {pattern}"
            )
    limit = sorted(
        {(r["kept"], r["uniform_speedup"]) for r in rows if r["pattern"] == "concentrated"}
    )
    ax.plot([k for k, _ in limit], [s for _, s in limit], "k--", label="uniform limit")
    flops = sorted({(r["kept"], r["flops_ratio"]) for r in rows if r["pattern"] == "concentrated"})
    ax.plot([k for k, _ in flops], [s for _, s in flops], "k:", label="FLOPs ratio")
    evidence.speedup_axes(
        ax,
        sorted({r["kept"] for r in rows}),
        "share of units kept",
        "speedup over dense (eager, 1 thread)",
        "grainfx rewrite: BERT-base size, batch 8, seq 128",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example_section(summary: dict) -> str:
    """The main job's last run: accuracy, parameters, speed, time."""
    enc, tot = summary["encoder_parameters"], summary["total_parameters"]
    return "\n".join(
        [
            f"Last run of `python examples/rotten_tomatoes.py` on this machine "
            f"({summary['threads']} threads, {summary['minutes']:.0f} min in all; a first run "
            f"also fine-tunes the teacher, which is cached after that):",
            "",
            "| | teacher | GRAIN student |",
            "|---|---:|---:|",
            f"| held-out accuracy | {summary['teacher_accuracy']:.2%} | "
            f"{summary['student_accuracy']:.2%} ({summary['retention']:.1%} retained) |",
            f"| encoder density | 100% | {summary['density']:.1%} |",
            f"| encoder parameters | {enc[0]:,} | {enc[1]:,} |",
            f"| total parameters | {tot[0]:,} | {tot[1]:,} |",
            f"| speed (batch 32, eager) | 1x | {summary['speedup_batch32']:.1f}x |",
        ]
    )


def step_cost_section(data: dict) -> str:
    """One sentence per measured step-cost record."""
    lines = []
    for record in data["records"].values():
        secs = record["seconds"]
        lines.append(
            f"- {record['model']}, {record['threads']} thread(s): a GRAIN step takes "
            f"{secs['grain']:.2f} s against {secs['plain']:.2f} s for a plain "
            f"distillation step ({record['ratio']:.2f}x), median of {record['steps']} "
            f"interleaved steps (`python benchmarks/step_cost.py`)."
        )
    return "\n".join(lines)


def predict_memory_section(data: dict) -> str:
    """The table of predict's peak memory and first-output time per number of stdin lines."""
    lines = [
        "| stdin lines | peak memory (RSS) | first line printed after | total |",
        "|---:|---:|---:|---:|",
    ]
    for r in data["records"]:
        lines.append(
            f"| {r['input_lines']:,} | {r['peak_rss_mib']:.1f} MiB "
            f"| {r['first_line_seconds']:.1f} s | {r['seconds']:.1f} s |"
        )
    lines.append(
        f"\n{data['meta']['what']}, 1 thread (`{data['meta']['command']}`); times on a shared "
        f"machine, memory flat in the number of lines."
    )
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start/end --> markers")
    return pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text)


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def sections() -> dict[str, str]:
    """Every README section that the results on disk allow, by marker name."""
    out = {}
    speed = _load("rewrite_speed.json")
    if speed:
        out["rewrite_speed"] = rewrite_speed_section(speed)
    cost = _load("step_cost.json")
    if cost:
        out["step_cost"] = step_cost_section(cost)
    example = _load("rotten_tomatoes_example.json")
    if example:
        out["example"] = example_section(example)
    rt, peer, ner = (
        _load("accuracy_rt.json"),
        _load("peer_torch_pruning.json"),
        _load("accuracy_ner.json"),
    )
    if rt:
        out["accuracy"] = evidence.accuracy_section(rt, peer)
    if peer:
        out["peer"] = evidence.peer_section(peer)
    if ner:
        out["ner"] = evidence.ner_section(ner)
    lm = _load("accuracy_lm.json")
    if lm:
        out["lm"] = evidence.lm_section(lm)
    out["targets"] = evidence.targets_section(rt, ner, lm, peer)
    sweep = _load("speed.json")
    if sweep:
        out["speed"] = evidence.speed_section(sweep)
    if rt:
        out["minilm5"] = evidence.side_by_side_section(rt, peer, sweep)
    memory = _load("predict_memory.json")
    if memory:
        out["predict_memory"] = predict_memory_section(memory)
    archs = _load("architectures.json")
    if archs:
        out["architectures"] = architectures.section(archs)
    session = ROOT / "examples" / "session" / "session.txt"
    if session.exists():
        out["cli_session"] = evidence.session_section(session.read_text())
    return out


def plots() -> None:
    """The PNGs the README shows, redrawn from the results."""
    speed = _load("rewrite_speed.json")
    if speed:
        rewrite_speed_plot(speed, RESULTS / "rewrite_speed.png")
    rt = _load("accuracy_rt.json")
    if rt:
        evidence.retention_plot(
            rt,
            _load("peer_torch_pruning.json"),
            _load("accuracy_ner.json"),
            RESULTS / "retention.png",
        )
    sweep = _load("speed.json")
    if sweep:
        evidence.speedup_plot(sweep, RESULTS / "speedup.png")
    model = RESULTS / "models" / "rt-grain-5.pt2"
    if model.exists():  # the model files are not committed: the plot is, drawn from one
        import grainfx

        grainfx.inspect(model).plot(RESULTS / "structure_rt_grain-5.png")


def main() -> int:
    text = README.read_text()
    for name, body in sections().items():
        text = replace_section(text, name, body)
    README.write_text(text)
    plots()
    return 0


if __name__ == "__main__":
    sys.exit(main())
