"""The ``grainfx`` command line: compress, inspect, bench.

    grainfx compress MODEL_DIR --data FILE.csv --sparsity 0.9 --out OUT_DIR
    grainfx compress MODEL_DIR --task causal-lm --data FILE.txt --out OUT_DIR
    grainfx compress --demo --out OUT_DIR
    grainfx compress ... --resume          # go on after Ctrl-C or a crash
    grainfx inspect OUT_DIR/model.pt2 [--plot kept.png] [--graph]
    grainfx bench OUT_DIR/model.pt2 [--against MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from passes.errors import PassError

log = logging.getLogger("grainfx")

#: ``--demo`` defaults: 2 epochs over Rotten Tomatoes at 1e-4 (GrainConfig's are 20 and 3e-5).
DEMO_EPOCHS, DEMO_LEARNING_RATE = 2.0, 1e-4
#: ``--task``: sequence classification (text and label rows) or a causal language model (text).
TASKS = ("classification", "causal-lm")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _quiet_transformers() -> None:
    """No "Loading weights" bars: noise on every load (only where transformers is used, so
    inspect and bench of a .pt2 alone do not import it)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _check_model_dir(model_dir: Path) -> None:
    _quiet_transformers()
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise CLIError(f"{model_dir} is not a model folder (no config.json): pass a folder "
                       f"written by save_pretrained, holding the fine-tuned model and tokenizer")


def _model(model_dir: Path, task: str):
    """(model, tokenizer) of ``model_dir``: a sequence classifier or a causal LM."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)
    _check_model_dir(model_dir)
    auto, what = {"classification": (AutoModelForSequenceClassification,
                                      "a sequence classifier"),
                  "causal-lm": (AutoModelForCausalLM, "a causal language model")}[task]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = auto.from_pretrained(model_dir).eval()
    except Exception as exc:
        raise CLIError(f"cannot load {what} and its tokenizer from "
                       f"{model_dir}: {exc}".splitlines()[0]) from exc
    return model, tokenizer


def _dense_model(model_dir: Path):
    """The model of ``model_dir`` as the class its config names (a sequence classifier when
    it names none), without a KV cache: the dense side of ``bench --against``."""
    import transformers
    _check_model_dir(model_dir)
    try:
        names = transformers.AutoConfig.from_pretrained(model_dir).architectures or []
        auto = transformers.AutoModelForSequenceClassification
        cls = getattr(transformers, names[0], auto) if names else auto
        model = cls.from_pretrained(model_dir).eval()
    except Exception as exc:
        raise CLIError(f"cannot load the model in {model_dir}: {exc}".splitlines()[0]) from exc
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # the compact model computes no cache either
    return model


def _rows(path: Path, text_column: str, label_column: str) -> list[tuple[str, int]]:
    import datasets
    if not path.is_file():
        raise CLIError(f"data file {path} does not exist")
    kind = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix.lower())
    if kind is None:
        raise CLIError(f"{path}: use a .csv or a .jsonl (JSON Lines) file")
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise CLIError(f"cannot read {path} as {kind}: {exc}".splitlines()[0]) from exc
    for column, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in table.column_names:
            raise CLIError(f"{path} has no column {column!r} (columns: {table.column_names}); "
                           f"name it with {option}")
    rows = []
    for i, (text, label) in enumerate(zip(table[text_column], table[label_column])):
        if label is None or text is None:
            raise CLIError(f"{path} row {i + 2}: {'label' if label is None else 'text'} is "
                           f"missing; every row needs a text and an integer label")
        rows.append((str(text), int(label)))
    if not rows:
        raise CLIError(f"{path} holds no rows")
    return rows


def _write_outputs(out: Path, overwrite: bool, write) -> None:
    """Write into a temporary folder beside ``out``, then move it into place."""
    if out.exists() and not overwrite:
        raise CLIError(f"{out} exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _classification(args):
    """(model, training batches, evaluate) of a sequence-classification run;
    ``evaluate(student)`` gives teacher and student held-out accuracy."""
    from grainfx import demo
    from grainfx.data import accuracy, stratified_split, text_batches

    if args.demo:
        _quiet_transformers()
        train, held_out = demo.rotten_tomatoes()
        model, tokenizer = demo.teacher(train, progress=not args.quiet)
        # the settings of examples/rotten_tomatoes.py, unless given
        args.epochs = args.epochs if args.epochs is not None else DEMO_EPOCHS
        args.learning_rate = args.learning_rate or DEMO_LEARNING_RATE
    else:
        if args.model_dir is None or args.data is None:
            raise CLIError("give MODEL_DIR and --data FILE (or --demo)")
        model, tokenizer = _model(args.model_dir, args.task)
        rows = _rows(args.data, args.text_column, args.label_column)
        if args.eval_data is not None:
            train, held_out = rows, _rows(args.eval_data, args.text_column, args.label_column)
        else:
            train, held_out = stratified_split(rows, args.eval_split, args.seed)
    labels = {y for _, y in train + held_out}
    classes = model.config.num_labels
    if not labels <= set(range(classes)):
        raise CLIError(f"labels {sorted(labels - set(range(classes)))} are outside the "
                       f"model's {classes} classes (0..{classes - 1})")
    log.info("compressing on %d examples, %d held out", len(train), len(held_out))
    batches = text_batches(train, tokenizer, args.batch_size, shuffle=True, seed=args.seed,
                           max_length=args.max_length, group_by_length=True)

    def evaluate(student) -> dict[str, float]:
        if not held_out:
            return {}
        evaluation = text_batches(held_out, tokenizer, 64, shuffle=False,
                                  max_length=args.max_length)
        return {"teacher_accuracy": accuracy(model, evaluation),
                "student_accuracy": accuracy(student, evaluation)}

    return model, batches, evaluate


def _causal_lm(args):
    """(model, training batches, evaluate) of a causal-LM run on documents of
    plain text or JSON Lines; ``evaluate(student)`` gives teacher and student held-out
    perplexity."""
    from grainfx.lm import DataError, lm_batches, perplexity, read_texts, split_texts

    if args.demo:
        raise CLIError("--demo is the sequence-classification demo: drop --task causal-lm")
    if args.model_dir is None or args.data is None:
        raise CLIError("give MODEL_DIR and --data FILE (plain text, one document a line, or "
                       ".jsonl)")
    try:
        texts = read_texts(args.data, args.text_column)
        if args.eval_data is not None:
            train, held_out = texts, read_texts(args.eval_data, args.text_column)
        else:
            train, held_out = split_texts(texts, args.eval_split, args.seed)
        model, tokenizer = _model(args.model_dir, args.task)
        batches = lm_batches(train, tokenizer, args.batch_size, shuffle=True, seed=args.seed,
                             max_length=args.max_length)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    log.info("compressing on %d documents, %d held out", len(train), len(held_out))

    def evaluate(student) -> dict[str, float]:
        if not held_out:
            return {}
        evaluation = lm_batches(held_out, tokenizer, args.batch_size, shuffle=False,
                                max_length=args.max_length)
        try:
            return {"teacher_perplexity": perplexity(model, evaluation),
                    "student_perplexity": perplexity(student, evaluation)}
        except ValueError as exc:
            raise CLIError(f"held-out documents: {exc}") from exc

    return model, batches, evaluate


def _score(key: str, value: float) -> str:
    """``teacher accuracy: 80.87%`` / ``student perplexity: 41.20``."""
    return f"{key.replace('_', ' ')}: " + (f"{value:.2%}" if key.endswith("accuracy")
                                           else f"{value:.2f}")


def cmd_compress(args) -> int:
    import torch

    import grainfx
    from grainfx.report import format_report

    if args.task not in TASKS:
        raise CLIError(f"unknown --task {args.task!r}: use one of {', '.join(TASKS)}")
    if not 0 <= args.sparsity < 1:
        raise CLIError(f"--sparsity must be in [0, 1) (0.9 keeps 10% of the encoder), got "
                       f"{args.sparsity}")
    if args.out.exists() and not args.overwrite:
        raise CLIError(f"{args.out} exists: choose another --out or pass --overwrite")
    torch.set_num_threads(args.threads)
    task = _causal_lm if args.task == "causal-lm" else _classification
    model, batches, evaluate = task(args)
    config = grainfx.GrainConfig(
        **{k: v for k, v in {"epochs": args.epochs, "steps": args.steps,
                             "learning_rate": args.learning_rate, "seed": args.seed,
                             "temperature": args.temperature,
                             "structure_alpha": args.structure_alpha,
                             "granularity": args.granularity}.items() if v is not None})
    checkpoint = grainfx.CheckpointConfig(_checkpoint_path(args), every=args.checkpoint_every,
                                          resume=args.resume)
    try:
        result = grainfx.compress(model, batches, args.sparsity, config=config,
                                  progress=not args.quiet, checkpoint=checkpoint)
    except KeyboardInterrupt:
        saved = checkpoint.path.is_file()
        print("grainfx compress: interrupted; "
              + (f"state saved in {checkpoint.path}: run the same command with --resume to go "
                 f"on" if saved else "nothing saved yet (no step was finished)"),
              file=sys.stderr)
        return 130
    scores = evaluate(result.module)
    report = {**result.report, "task": args.task, **scores}
    inspection = grainfx.inspect(result.module)

    def write(folder: Path) -> None:
        grainfx.save(result.module, folder / "model.pt2")
        (folder / "report.json").write_text(json.dumps(report, indent=1))
        summary = "\n".join(f"- {_score(k, v)}" for k, v in scores.items())
        (folder / "report.md").write_text(f"# grainfx compress\n\n{summary}\n\n"
                                          f"{format_report(report)}\n")
        inspection.plot(folder / "structure.png")

    _write_outputs(args.out, args.overwrite, write)
    checkpoint.path.unlink(missing_ok=True)
    print(format_report(report))
    for key, value in scores.items():
        print(_score(key, value))
    print(f"wrote {args.out}/model.pt2, model.json, report.json, report.md, structure.png")
    return 0


def _checkpoint_path(args) -> Path:
    return args.checkpoint or args.out.with_name(f"{args.out.name}.checkpoint.pt")


def _load_pt2(path: Path):
    """The module saved in ``path``; a missing or foreign file is a CLIError."""
    import passes
    if not path.is_file():
        raise CLIError(f"{path} does not exist: pass a .pt2 written by grainfx compress / save")
    try:
        return passes.load(path)
    except passes.LoadError as exc:
        raise CLIError(str(exc)) from exc


def cmd_inspect(args) -> int:
    import grainfx

    module = _load_pt2(args.file)
    inspection = grainfx.inspect(module, seq=args.seq)
    if args.json:
        print(json.dumps([layer.__dict__ for layer in inspection.layers], indent=1))
    else:
        print(inspection)
    if args.plot:
        print(f"wrote {inspection.plot(args.plot)}")
    if args.graph:
        print(module.graph_module.print_readable(print_output=False)
              if hasattr(module, "graph_module") else module.code)
    return 0


def cmd_bench(args) -> int:
    import torch

    from grainfx.timing import example_inputs, interleaved_medians

    torch.set_num_threads(args.threads)
    compact = _load_pt2(args.file)
    try:
        inputs = example_inputs(compact.grainfx_kept, args.batch, args.seq)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    models = {"compact": compact}
    if args.against is not None:
        models["dense"] = _dense_model(args.against)
    rows = []
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        fns = {name: (torch.compile(m) if mode == "compiled" else m) for name, m in models.items()}
        times = interleaved_medians({n: (lambda f=f: f(**inputs)) for n, f in fns.items()},
                                    args.reps)
        for name, seconds in times.items():
            ratio = times["dense"] / seconds if "dense" in times else None
            rows.append({"mode": mode, "model": name, "ms": seconds * 1e3, "speedup": ratio})
    print(f"batch {args.batch}, sequence {args.seq}, {args.threads} thread(s), median of "
          f"{args.reps} interleaved runs")
    for r in rows:
        extra = f"  {r['speedup']:.2f}x vs dense" if r["speedup"] is not None else ""
        print(f"{r['mode']:>9} {r['model']:>8}: {r['ms']:9.2f} ms{extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (CLIError, PassError) as exc:
        print(f"grainfx {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grainfx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="prune a fine-tuned classifier (CSV / JSONL rows) or "
                                        "a causal language model (text)")
    c.add_argument("model_dir", type=Path, nargs="?", help="a save_pretrained folder")
    c.add_argument("--task", default="classification",
                   help=f"one of {', '.join(TASKS)} (default classification)")
    c.add_argument("--data", type=Path,
                   help="training rows: .csv or .jsonl; for causal-lm plain text (one "
                        "document a line) or .jsonl")
    c.add_argument("--eval-data", type=Path, help="held-out rows (default: a split of --data)")
    c.add_argument("--eval-split", type=float, default=0.1, help="held-out share of --data")
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--sparsity", type=float, default=0.9, help="share of encoder removed")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("--demo", action="store_true",
                   help="MiniLM fine-tuned on the offline Rotten Tomatoes data")
    c.add_argument("--epochs", type=float, help="passes over --data (default 20; --demo 2)")
    c.add_argument("--steps", type=int, help="exact number of steps (overrides --epochs)")
    c.add_argument("--learning-rate", type=float,
                   help="AdamW learning rate (default 3e-5; --demo 1e-4)")
    c.add_argument("--temperature", type=float, help="distillation temperature (default 8)")
    c.add_argument("--structure-alpha", type=float,
                   help="structure regularization strength (default 0.3)")
    c.add_argument("--granularity", choices=["intra", "head"],
                   help="intra: query/value units and FFN neurons (default); head: whole heads")
    c.add_argument("--batch-size", type=int, default=32,
                   help="texts per batch (batched by similar length, to pad little)")
    c.add_argument("--max-length", type=int, default=128, help="tokens per text, at most")
    c.add_argument("--seed", type=int, default=0, help="seed of the split, order and dropout")
    c.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    c.add_argument("--checkpoint", type=Path,
                   help="checkpoint file (default: OUT.checkpoint.pt beside --out)")
    c.add_argument("--checkpoint-every", type=int, default=100,
                   help="save a checkpoint every N steps (and on Ctrl-C)")
    c.add_argument("--resume", action="store_true",
                   help="go on from the checkpoint of an interrupted run (same settings)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(run=cmd_compress)

    i = sub.add_parser("inspect", help="show what a compact model kept")
    i.add_argument("file", type=Path)
    i.add_argument("--seq", type=int, default=128, help="sequence length for FLOPs")
    i.add_argument("--plot", type=Path, help="draw the kept structure to this PNG")
    i.add_argument("--graph", action="store_true", help="print the compact graph")
    i.add_argument("--json", action="store_true", help="print the table as JSON")
    i.set_defaults(run=cmd_inspect)

    b = sub.add_parser("bench", help="latency of a compact model (vs the dense one)")
    b.add_argument("file", type=Path)
    b.add_argument("--against", type=Path, help="the dense model folder")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--compile", action="store_true", help="also time torch.compile")
    b.set_defaults(run=cmd_bench)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
