"""The ``grainfx`` command line: compress, predict, inspect, bench.

grainfx compress MODEL_DIR --data FILE.csv --sparsity 0.9 --out OUT_DIR
grainfx compress MODEL_DIR --task causal-lm --data FILE.txt --out OUT_DIR
grainfx compress --demo --out OUT_DIR
grainfx compress ... --resume          # go on after Ctrl-C or a crash
grainfx compress ... --check           # the preflight alone: data, labels, disk, model
torchrun --nproc-per-node N -m grainfx compress ...   # N processes (rank 0 writes)
grainfx predict OUT_DIR --data FILE.csv   # label names and scores (text lines on stdin)
grainfx inspect OUT_DIR/model.pt2 [--plot kept.png] [--graph]
grainfx bench OUT_DIR/model.pt2 [--against MODEL_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from grainfx.output import write_folder
from grainfx.predict import SERVING_FILE, Serving
from passes.errors import PassError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from grainfx.predict import Prediction
    from grainfx.rows import Row

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
        raise CLIError(
            f"{model_dir} is not a model folder (no config.json): pass a folder "
            f"written by save_pretrained, holding the fine-tuned model and tokenizer"
        )


#: What each --task compresses, in the words of the messages.
TASK_MODELS = {"classification": "a sequence classifier", "causal-lm": "a causal language model"}
#: The transformers auto mapping that lists the architectures each --task compresses.
TASK_MAPPINGS = {
    "classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}
#: The fix for a model of a task the command line does not compress.
NO_TASK = (
    f"grainfx compress has no --task for it (only {', '.join(TASKS)}); "
    f"compress it from Python with grainfx.compress"
)
#: What a model class is, by the first of these auto mappings that lists it, and the fix
#: when it is not what --task compresses.
ARCHITECTURE_KINDS = (
    (TASK_MAPPINGS["classification"], TASK_MODELS["classification"], "pass --task classification"),
    (TASK_MAPPINGS["causal-lm"], TASK_MODELS["causal-lm"], "pass --task causal-lm"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "a token classifier", NO_TASK),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "a question-answering model", NO_TASK),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "a masked language model", NO_TASK),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "a sequence-to-sequence model", NO_TASK),
    (
        "MODEL_MAPPING_NAMES",
        "a bare model without a task head",
        "fine-tune it with the task's head and save that model (save_pretrained)",
    ),
)
#: Files a saved tokenizer leaves in its folder (one is enough): without any of them
#: transformers makes a tokenizer of the special tokens alone, and every word is unknown.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
#: A tokenizer with fewer tokens than this share of the model's embedding rows is not the
#: model's (models pad their embedding matrix by a few percent at most).
MIN_VOCABULARY_SHARE = 0.5


def _listed(name: str, mapping: str) -> bool:
    """Whether transformers' auto mapping ``mapping`` (a name in ``modeling_auto``) lists the
    model class ``name``."""
    from transformers.models.auto import modeling_auto

    for classes in getattr(modeling_auto, mapping).values():
        if name in ((classes,) if isinstance(classes, str) else classes):
            return True
    return False


def _check_task(model_dir: Path, architectures: Sequence[str], task: str) -> None:
    """Refuse a model whose config names an architecture of another task than ``--task``
    (a token classifier given to classification would get a new, random head); a config
    that names none, or only classes transformers does not list, is left to the loading."""
    if any(_listed(name, TASK_MAPPINGS[task]) for name in architectures):
        return
    for name in architectures:
        for mapping, what, fix in ARCHITECTURE_KINDS:
            if _listed(name, mapping):
                raise CLIError(
                    f"{model_dir} holds {what} ({name}), not {TASK_MODELS[task]} "
                    f"(--task {task}): {fix}"
                )


def _check_tokenizer_files(model_dir: Path) -> None:
    """Refuse a model folder without tokenizer files (transformers would make one of the
    special tokens alone, and every text would read as unknown words)."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CLIError(
            f"{model_dir} holds no tokenizer (no tokenizer.json, tokenizer_config.json or "
            f"vocabulary file): save the model's tokenizer into that folder too, with "
            f"tokenizer.save_pretrained"
        )


def _check_new_weights(model_dir: Path, missing: Collection[str], what: str) -> None:
    """Refuse a model whose loading started parameters at random because the folder lacks
    them (``missing_keys`` of ``from_pretrained``): a new head or pooler, not fine-tuned."""
    if missing:
        names = sorted(missing)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise CLIError(
            f"{model_dir} has no weights for {', '.join(names[:3])}{more}: loaded as {what}, "
            f"they would start at random (a new head or pooler); pass the folder of the "
            f"fine-tuned model, saved whole with save_pretrained"
        )


def _check_vocabulary(
    model_dir: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> None:
    """Refuse a tokenizer whose vocabulary does not fit the model's embedding matrix: ids
    past its rows, or far fewer tokens than rows (the tokenizer of another model)."""
    rows = cast("torch.Tensor", model.get_input_embeddings().weight).shape[0]
    tokens = len(tokenizer)
    if tokens > rows or tokens < MIN_VOCABULARY_SHARE * rows:
        raise CLIError(
            f"the tokenizer in {model_dir} has {tokens} tokens but the model's embeddings "
            f"have {rows} rows: it is not this model's tokenizer; save the model's own "
            f"tokenizer into the folder (tokenizer.save_pretrained)"
        )


def _model(model_dir: Path, task: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of ``model_dir``: a sequence classifier or a causal LM, refused
    when its architecture is another task's, a parameter would start at random, or the
    tokenizer does not fit it."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    _check_model_dir(model_dir)
    auto = {
        "classification": AutoModelForSequenceClassification,
        "causal-lm": AutoModelForCausalLM,
    }[task]
    what = TASK_MODELS[task]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no load report: the checks below read the loading
    try:
        architectures = AutoConfig.from_pretrained(model_dir).architectures or []
        _check_task(model_dir, architectures, task)
        _check_tokenizer_files(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model, loading = auto.from_pretrained(model_dir, output_loading_info=True)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(
            f"cannot load {what} and its tokenizer from {model_dir}: {exc}".splitlines()[0]
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_new_weights(model_dir, loading["missing_keys"], what)
    _check_vocabulary(model_dir, tokenizer, model)
    return model.eval(), tokenizer


def _dense_model(model_dir: Path) -> torch.nn.Module:
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


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _read(path: Path, args: argparse.Namespace, labels: bool = True) -> list[Row]:
    """The rows of ``path`` (a DataError is a CLIError)."""
    from grainfx.rows import DataError, read_rows

    try:
        return read_rows(path, args.text_column, args.label_column, labels=labels)
    except DataError as exc:
        raise CLIError(str(exc)) from None


def _fast_tokenizer(tokenizer: PreTrainedTokenizerBase, model_dir: Path | str) -> Tokenizer:
    """The ``tokenizers`` object of ``tokenizer``: the output folder serves text with it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CLIError(
            f"the tokenizer of {model_dir} has no fast (tokenizers) version, which "
            f"the output folder needs (tokenizer.json): save the model folder with "
            f"a fast tokenizer"
        )
    return backend


def _fit_max_length(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Cut ``--max-length`` to what the model and tokenizer can take (their positions), so
    that a long text cannot fail a step hours in; the output records the value used."""
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    fit = min([args.max_length] + [n for n in limits if isinstance(n, int) and 0 < n < 10**6])
    if fit < args.max_length:
        log.info(
            "--max-length %d is more than the model takes: texts are cut at %d tokens",
            args.max_length,
            fit,
        )
        args.max_length = fit


@dataclass
class Run:
    """What a compress run needs beyond its settings: the model and tokenizer, training
    batches, ``evaluate(student)`` (held-out scores), what the output folder serves with
    (``serving``), and the content hashes a resumed run must match (``identity``)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    batches: torch.utils.data.DataLoader
    evaluate: Callable[[Callable[..., Any]], dict[str, float]]
    serving: Serving
    identity: dict[str, str]


def _classification(args: argparse.Namespace) -> Run:
    """A sequence-classification run; ``evaluate(student)`` gives teacher and student held-out
    accuracy. Every row is read before the model is loaded, and every label mapped before
    anything is trained."""
    from grainfx import demo, distributed
    from grainfx.data import accuracy, stratified_split, text_batches
    from grainfx.rows import DataError, label_ids

    if args.demo:
        _quiet_transformers()
        train, held_out = demo.rotten_tomatoes()
        with distributed.main_first():  # rank 0 fine-tunes and caches, the others read
            model, tokenizer = demo.teacher(
                train, progress=not args.quiet and distributed.is_main()
            )
        raw = [y for _, y in train + held_out]
        label2id: Mapping[str, int] | None = {name: i for i, name in enumerate(demo.LABELS)}
        identity = {"demo data": _digest(json.dumps(train + held_out).encode())}
    else:
        if args.model_dir is None or args.data is None:
            raise CLIError("give MODEL_DIR and --data FILE (or --demo)")
        rows = _read(args.data, args)
        held = _read(args.eval_data, args) if args.eval_data is not None else []
        identity = {"--data file": _digest(args.data.read_bytes())}
        if args.eval_data is not None:
            identity["--eval-data file"] = _digest(args.eval_data.read_bytes())
        model, tokenizer = _model(args.model_dir, args.task)
        texts, raw = [r.text for r in rows + held], [r.label for r in rows + held]
        label2id = getattr(model.config, "label2id", None)
    classes = model.config.num_labels
    if classes is None:
        raise CLIError(
            "the model's config names no classes (num_labels): pass a sequence classifier"
        )
    try:
        ids, names = label_ids(raw, classes, label2id)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    if not args.demo:
        labelled = list(zip(texts, ids, strict=True))
        train, held_out = (
            (labelled[: len(rows)], labelled[len(rows) :])
            if args.eval_data is not None
            else stratified_split(labelled, args.eval_split, args.seed)
        )
    backend = _fast_tokenizer(tokenizer, args.model_dir if not args.demo else "the demo")
    _fit_max_length(args, model, tokenizer)
    if tokenizer.pad_token is None:
        raise CLIError(
            "the tokenizer has no pad token to batch texts with: set one "
            "(tokenizer.pad_token = ...) and save the model folder again"
        )
    log.info("compressing on %d examples, %d held out", len(train), len(held_out))
    batches = text_batches(
        train,
        tokenizer,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        max_length=args.max_length,
        group_by_length=True,
        shard=args.shard,
    )

    def evaluate(student: Callable[..., Any]) -> dict[str, float]:
        if not held_out:
            return {}
        evaluation = text_batches(
            held_out, tokenizer, 64, shuffle=False, max_length=args.max_length
        )
        return {
            "teacher_accuracy": accuracy(model, evaluation),
            "student_accuracy": accuracy(student, evaluation),
        }

    serving = Serving(
        "classification",
        tuple(names),
        args.max_length,
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        tokenizer.padding_side,
        tokenizer.truncation_side,
    )
    identity["tokenizer"] = _digest(backend.to_str().encode())
    return Run(model, tokenizer, batches, evaluate, serving, identity)


def _causal_lm(args: argparse.Namespace) -> Run:
    """A causal-LM run on documents of plain text or JSON Lines; ``evaluate(student)``
    gives teacher and student held-out perplexity."""
    from grainfx.lm import DataError, lm_batches, perplexity, read_texts, split_texts

    if args.demo:
        raise CLIError("--demo is the sequence-classification demo: drop --task causal-lm")
    if args.model_dir is None or args.data is None:
        raise CLIError(
            "give MODEL_DIR and --data FILE (plain text, one document a line, or .jsonl)"
        )
    try:
        texts = read_texts(args.data, args.text_column)
        identity = {"--data file": _digest(args.data.read_bytes())}
        if args.eval_data is not None:
            train, held_out = texts, read_texts(args.eval_data, args.text_column)
            identity["--eval-data file"] = _digest(args.eval_data.read_bytes())
        else:
            train, held_out = split_texts(texts, args.eval_split, args.seed)
        model, tokenizer = _model(args.model_dir, args.task)
        backend = _fast_tokenizer(tokenizer, args.model_dir)
        _fit_max_length(args, model, tokenizer)
        batches = lm_batches(
            train,
            tokenizer,
            args.batch_size,
            shuffle=True,
            seed=args.seed,
            max_length=args.max_length,
            shard=args.shard,
        )
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    log.info("compressing on %d documents, %d held out", len(train), len(held_out))

    def evaluate(student: Callable[..., Any]) -> dict[str, float]:
        if not held_out:
            return {}
        evaluation = lm_batches(
            held_out, tokenizer, args.batch_size, shuffle=False, max_length=args.max_length
        )
        try:
            return {
                "teacher_perplexity": perplexity(model, evaluation),
                "student_perplexity": perplexity(student, evaluation),
            }
        except ValueError as exc:
            raise CLIError(f"held-out documents: {exc}") from exc

    serving = Serving(
        "causal-lm",
        (),
        args.max_length,
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        "right",
        tokenizer.truncation_side,
    )
    identity["tokenizer"] = _digest(backend.to_str().encode())
    return Run(model, tokenizer, batches, evaluate, serving, identity)


def _score(key: str, value: float) -> str:
    """``teacher accuracy: 80.87%`` / ``student perplexity: 41.20``."""
    return f"{key.replace('_', ' ')}: " + (
        f"{value:.2%}" if key.endswith("accuracy") else f"{value:.2f}"
    )


def _check_settings(args: argparse.Namespace) -> None:
    """The options that need no file: one line per mistake, before anything is read."""
    if args.task not in TASKS:
        raise CLIError(f"unknown --task {args.task!r}: use one of {', '.join(TASKS)}")
    if not 0 <= args.sparsity < 1:
        raise CLIError(
            f"--sparsity must be in [0, 1) (0.9 keeps 10% of the encoder), got {args.sparsity}"
        )
    for option, value in (
        ("--batch-size", args.batch_size),
        ("--max-length", args.max_length),
        ("--threads", args.threads),
        ("--accumulate", args.accumulate),
    ):
        if value < 1:
            raise CLIError(f"{option} must be an integer >= 1, got {value}")
    if not 0 <= args.eval_split < 1:
        raise CLIError(
            f"--eval-split must be in [0, 1) (the held-out share of --data), got {args.eval_split}"
        )
    _check_out_location(args)
    if args.out.exists() and not args.overwrite:
        raise CLIError(f"{args.out} exists: choose another --out or pass --overwrite")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file: give a folder path")
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("the output's structure.png needs matplotlib: pip install matplotlib")


def _check_out_location(args: argparse.Namespace) -> None:
    """``--out`` (replaced whole with --overwrite) must not be, hold or lie in the model
    folder, nor be or hold a data file: refused with or without --overwrite."""
    out = args.out.resolve()
    if args.model_dir is not None:
        model = args.model_dir.resolve()
        relation = (
            "is"
            if out == model
            else "holds"
            if out in model.parents
            else "lies inside"
            if model in out.parents
            else None
        )
        if relation is not None:
            raise CLIError(
                f"--out {args.out} {relation} the model folder {args.model_dir}: choose an "
                f"--out outside it, so that the model stays as it is"
            )
    for option, data in (("--data", args.data), ("--eval-data", args.eval_data)):
        if data is None:
            continue
        path = data.resolve()
        relation = (
            "is the"
            if out == path
            else "is the folder of the"
            if out == path.parent
            else "holds the"
            if out in path.parents
            else None
        )
        if relation is not None:
            raise CLIError(
                f"--out {args.out} {relation} {option} file {data}: choose an --out that "
                f"holds no data file, so that the data stays as it is"
            )


def _lock_out(args: argparse.Namespace, rank: int, held: contextlib.ExitStack) -> bool:
    """This run alone writes ``--out``, until ``held`` closes (rank 0 holds the lock): a
    second run on the same --out is refused at once, naming the first one. False on the
    other ranks when rank 0 was refused (it says why)."""
    from grainfx import distributed
    from grainfx.output import FolderLocked, locked

    busy = None
    if rank == 0:
        try:
            held.enter_context(locked(args.out))
        except FolderLocked as exc:
            busy = exc
    if not distributed.any_rank(busy is not None):
        return True
    if busy is None:
        return False
    holder = f"process {busy.pid}" if busy.pid is not None else "another process"
    raise CLIError(
        f"--out {args.out} is being written by another grainfx run ({holder}): wait for "
        f"it to end, or choose another --out"
    )


def cmd_compress(args: argparse.Namespace) -> int:
    """Preflight (settings, locations, every data row and label, free space, the model
    captured on one batch), then the training, then one atomic write of the output folder.

    Under torchrun (``WORLD_SIZE`` > 1) the processes join one gloo process group: each reads
    its share of every batch of ``--batch-size`` (the batch of a step over all processes and
    ``--accumulate`` micro-batches), they train together, and rank 0 alone evaluates, writes
    the checkpoint and the output folder and prints.
    """
    import torch.distributed as dist

    from grainfx import distributed

    created = distributed.init_from_env("cpu")
    try:
        with contextlib.ExitStack() as held:  # the lock of --out, from the preflight on
            return _compress(args, held)
    finally:
        if created:
            dist.destroy_process_group()


def _compress(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    """:func:`cmd_compress` in its process (group); ``held`` keeps the lock of --out."""
    import torch

    import grainfx
    from grainfx import checkpoint as checkpoints
    from grainfx import distributed, preflight
    from grainfx.compress import check
    from grainfx.report import format_report

    _check_settings(args)
    rank, ranks = distributed.world()
    if args.batch_size < ranks * args.accumulate:
        raise CLIError(
            f"--batch-size {args.batch_size} is the batch of one step over all {ranks} "
            f"processes and {args.accumulate} micro-batches: give at least "
            f"{ranks * args.accumulate}"
        )
    args.shard = (rank, ranks, args.accumulate)
    if args.demo:  # the settings of examples/rotten_tomatoes.py, unless given
        args.epochs = args.epochs if args.epochs is not None else DEMO_EPOCHS
        args.learning_rate = args.learning_rate or DEMO_LEARNING_RATE
    checkpoint_path = _checkpoint_path(args)
    preflight.writable_folder(
        args.out.parent, f"the output --out {args.out}", "choose another --out"
    )
    preflight.writable_folder(
        checkpoint_path.parent, f"the checkpoint {checkpoint_path}", "choose another --checkpoint"
    )
    if not _lock_out(args, rank, held):
        return 2
    config = grainfx.GrainConfig(
        **{
            k: v
            for k, v in {
                "epochs": args.epochs,
                "steps": args.steps,
                "accumulate": args.accumulate,
                "learning_rate": args.learning_rate,
                "seed": args.seed,
                "temperature": args.temperature,
                "structure_alpha": args.structure_alpha,
                "granularity": args.granularity,
                "ema_beta": args.ema_beta,
                "latency_aware": args.latency_aware or None,
                "latency_shape": _latency_shape(args.latency_shape),
            }.items()
            if v is not None
        }
    )
    checkpoint = grainfx.CheckpointConfig(
        checkpoint_path, every=args.checkpoint_every, resume=args.resume
    )
    torch.set_num_threads(args.threads)
    run = (_causal_lm if args.task == "causal-lm" else _classification)(args)
    # the output: at most the dense model's size (with the tokenizer and plot), written
    # beside a previous output until it replaces it
    model_size = preflight.model_bytes(run.model)
    preflight.free_space(
        [
            (args.out.parent, 2 * model_size, "the output"),
            (checkpoint_path.parent, preflight.checkpoint_bytes(run.model), "a checkpoint"),
        ],
        "choose another --out / --checkpoint",
    )
    checkpoint = dataclasses.replace(checkpoint, identity=run.identity)
    if args.check:
        if args.resume:
            checkpoints.check(checkpoint.path, checkpoint.identity)
        structure = check(run.model, run.batches, args.sparsity, config=config)
        if rank != 0:
            return 0
        print(
            f"preflight passed: data, labels, {args.out} and {checkpoint_path} writable, "
            f"free space; the model captured with {len(structure.attention)} attention and "
            f"{len(structure.ffn)} FFN blocks; run again without --check to compress"
        )
        return 0
    try:
        result = grainfx.compress(
            run.model,
            run.batches,
            args.sparsity,
            config=config,
            progress=not args.quiet,
            checkpoint=checkpoint,
        )
    except KeyboardInterrupt:
        if rank != 0:
            return 130
        saved = checkpoint.path.is_file()
        print(
            "grainfx compress: interrupted; "
            + (
                f"state saved in {checkpoint.path}: run the same command with --resume to go on"
                if saved
                else "nothing saved yet (no step was finished)"
            ),
            file=sys.stderr,
        )
        return 130
    if rank != 0:  # rank 0 evaluates and writes
        return 0
    scores = run.evaluate(result.module)
    report = {**result.report, "task": args.task, **scores}
    inspection = grainfx.inspect(result.module)

    def write(folder: Path) -> None:
        grainfx.save(result.module, folder / "model.pt2")
        run.tokenizer.save_pretrained(folder)
        (folder / SERVING_FILE).write_text(run.serving.to_json())
        (folder / "report.json").write_text(json.dumps(report, indent=1))
        summary = "\n".join(f"- {_score(k, v)}" for k, v in scores.items())
        (folder / "report.md").write_text(
            f"# grainfx compress\n\n{summary}\n\n{format_report(report)}\n"
        )
        inspection.plot(folder / "structure.png")

    try:
        write_folder(args.out, write)
    except (OSError, PassError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        reason = (
            cause.strerror
            if isinstance(cause, OSError) and cause.strerror
            else str(exc).splitlines()[0]
        )
        again = (
            f"with --resume (the trained state is in {checkpoint.path})"
            if checkpoint.path.is_file()
            else "again (no checkpoint could be saved)"
        )
        print(
            f"grainfx compress: error: cannot write the output {args.out} ({reason}): free "
            f"disk space or choose another --out, then run the same command {again}; any "
            f"previous output is untouched",
            file=sys.stderr,
        )
        return 2
    checkpoint.path.unlink(missing_ok=True)
    print(format_report(report))
    for key, value in scores.items():
        print(_score(key, value))
    print(
        f"wrote {args.out}/: model.pt2, tokenizer, {SERVING_FILE} (labels, max length), "
        f"model.json, report.json, report.md, structure.png"
    )
    return 0


def _checkpoint_path(args: argparse.Namespace) -> Path:
    return args.checkpoint or args.out.with_name(f"{args.out.name}.checkpoint.pt")


def _class_ids(rows: Sequence[Row], names: tuple[str, ...], path: Path) -> list[int]:
    """The class id of each row's label: a name of the model, or an integer id."""
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row in rows:
        text = str(row.label).strip()
        if text in index:
            ids.append(index[text])
        elif text.lstrip("+-").isdigit() and 0 <= int(text) < len(names):
            ids.append(int(text))
        else:
            raise CLIError(
                f"{path} line {row.line}: label {text!r} is not one of the model's "
                f"labels {list(names)} nor an id 0..{len(names) - 1}"
            )
    return ids


#: Output suffixes of ``predict --out``.
PREDICTION_SUFFIXES = (".csv", ".jsonl")


class _PredictionFile:
    """``predict --out``: a .csv / .jsonl written a batch at a time into a temporary file
    beside ``path``, which replaces ``path`` when every row is done (removed on a failure)."""

    def __init__(self, path: Path):
        import csv

        self.path, self.jsonl = path, path.suffix.lower() == ".jsonl"
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            self.file = open(self.partial, "x", newline="", encoding="utf-8")
        except OSError as exc:
            raise self._error(exc) from None
        self.csv = csv.writer(self.file)
        if not self.jsonl:
            self.write_rows([["text", "label", "score"]])

    def _error(self, exc: OSError) -> CLIError:
        return CLIError(f"cannot write {self.path} ({exc.strerror}): choose another --out")

    def write_rows(self, rows: Sequence[Sequence[object]]) -> None:
        try:
            self.csv.writerows(rows)
        except OSError as exc:
            raise self._error(exc) from None

    def write(self, rows: Sequence[Row], predictions: Sequence[Prediction]) -> None:
        if not self.jsonl:
            self.write_rows(
                [
                    [r.text, p.label, round(p.score, 6)]
                    for r, p in zip(rows, predictions, strict=True)
                ]
            )
            return
        records = (
            {
                "text": r.text,
                "label": p.label,
                "score": round(p.score, 6),
                "scores": {k: round(v, 6) for k, v in p.scores.items()},
            }
            for r, p in zip(rows, predictions, strict=True)
        )
        try:
            self.file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        except OSError as exc:
            raise self._error(exc) from None

    def finish(self, done: bool) -> None:
        """Closes the file: it replaces ``path`` when ``done``, else it is removed."""
        try:
            self.file.close()
            if done:
                os.replace(self.partial, self.path)
        except OSError as exc:
            done = False
            raise self._error(exc) from None
        finally:
            if not done:
                self.partial.unlink(missing_ok=True)


def _stdin_rows() -> Iterator[Row]:
    """The non-blank lines of stdin as rows, read as they come."""
    from grainfx.rows import Row

    number = 0
    try:
        for number, line in enumerate(sys.stdin, 1):
            if line.strip():
                yield Row(line.rstrip("\r\n"), None, number)
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"<stdin> line {number + 1} is not {exc.encoding} text (byte "
            f"0x{exc.object[exc.start]:02x}): pipe UTF-8 text"
        ) from None


def _file_rows(path: Path, args: argparse.Namespace) -> Iterator[Row]:
    """The rows of ``path``, read as they are taken (a DataError is a CLIError)."""
    from grainfx.rows import DataError, iter_rows

    try:
        yield from iter_rows(path, args.text_column, args.label_column, labels=False)
    except DataError as exc:
        raise CLIError(str(exc)) from None


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cmd_predict(args: argparse.Namespace) -> int:
    """Label names and scores of the folder's classifier on --data rows (or stdin lines);
    the accuracy too when the rows have labels. Needs torch and tokenizers only.

    Rows are read, predicted and written a batch of --batch-size at a time: memory does not
    grow with the number of rows, and the first batch's lines are printed before the input
    ends (a pipe into stdin gives its lines as they come)."""
    import torch

    from grainfx.predict import load_folder

    for option, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            raise CLIError(f"{option} must be an integer >= 1, got {value}")
    if args.out is not None and args.out.suffix.lower() not in PREDICTION_SUFFIXES:
        raise CLIError(f"--out {args.out}: write predictions to a .csv or a .jsonl file")
    if not args.folder.is_dir():
        raise CLIError(f"{args.folder} is not a folder: pass the --out folder of grainfx compress")
    torch.set_num_threads(args.threads)
    predictor = load_folder(args.folder)  # what grainfx.load gives for a folder
    if predictor.serving.task != "classification":
        raise CLIError(
            f"{args.folder} holds a {predictor.serving.task} model: predict gives "
            f"the labels of a classifier (grainfx.load(folder) on texts gives logits)"
        )
    rows, source = (
        (_file_rows(args.data, args), args.data)
        if args.data is not None
        else (_stdin_rows(), Path("<stdin>"))
    )
    output = _PredictionFile(args.out) if args.out is not None else None
    count = correct = 0
    labelled, done = False, False
    try:
        for batch in _batches(rows, args.batch_size):
            truth = (
                _class_ids(batch, predictor.labels, source) if batch[0].label is not None else None
            )
            predictions = predictor.predict([r.text for r in batch], args.batch_size)
            count += len(batch)
            if truth is not None:
                labelled = True
                correct += sum(
                    predictor.labels[t] == p.label for t, p in zip(truth, predictions, strict=True)
                )
            if output is not None:
                output.write(batch, predictions)
                continue
            try:
                for row, p in zip(batch, predictions, strict=True):
                    print(f"{p.label}\t{p.score:.4f}\t{row.text}")
                sys.stdout.flush()
            except BrokenPipeError:  # the reader stopped early (``| head``): not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
        if not count:
            raise CLIError("no text on stdin: pipe text lines in, or give --data FILE")
        done = True
    finally:
        if output is not None:
            output.finish(done)
    if output is not None:
        print(f"wrote {count} predictions to {args.out}", file=sys.stderr)
    if labelled:
        print(f"accuracy: {correct / count:.2%} ({correct} of {count} rows)", file=sys.stderr)
    return 0


def _load_pt2(path: Path) -> torch.nn.Module:
    """The module saved in ``path``; a missing or foreign file is a CLIError."""
    import passes

    if not path.is_file():
        raise CLIError(f"{path} does not exist: pass a .pt2 written by grainfx compress / save")
    try:
        return passes.load(path)
    except passes.LoadError as exc:
        raise CLIError(str(exc)) from exc


def _check_plot(path: Path) -> None:
    """Refuses a ``--plot`` path that the plot cannot be written to, before anything runs."""
    from grainfx.preflight import writable_folder

    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--plot needs matplotlib: pip install matplotlib")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.is_dir():
        raise CLIError(f"--plot {path} is a folder: give an image file, e.g. {path / 'kept.png'}")
    if path.suffix.lower().lstrip(".") not in formats:
        raise CLIError(
            f"--plot {path}: give an image file name ending in .png or another format "
            f"matplotlib writes ({', '.join('.' + f for f in formats)})"
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise CLIError(
            f"cannot write the plot {path}: {path.parent} is a file, not a folder; "
            f"choose another --plot"
        )
    if not path.parent.is_dir():
        raise CLIError(
            f"cannot write the plot {path}: the folder {path.parent} does not exist; "
            f"create it or choose another --plot"
        )
    writable_folder(path.parent, f"the plot {path}", "choose another --plot")


def cmd_inspect(args: argparse.Namespace) -> int:
    import grainfx

    if args.plot:
        _check_plot(args.plot)
    module = _load_pt2(args.file)
    inspection = grainfx.inspect(module, seq=args.seq)
    if args.json:
        print(json.dumps([layer.__dict__ for layer in inspection.layers], indent=1))
    else:
        print(inspection)
    if args.plot:
        try:
            print(f"wrote {inspection.plot(args.plot)}")
        except (OSError, ValueError) as exc:  # ValueError: a format this matplotlib lacks
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            raise CLIError(
                f"cannot write the plot {args.plot} ({reason}): choose another --plot"
            ) from None
    if args.graph:
        graph_module = getattr(module, "graph_module", None)
        print(
            graph_module.print_readable(print_output=False)
            if graph_module is not None
            else module.code
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import functools

    import torch

    from grainfx.timing import example_inputs, interleaved_medians
    from passes.serialize import INPUTS_ATTR

    torch.set_num_threads(args.threads)
    compact = _load_pt2(args.file)
    try:
        inputs = example_inputs(getattr(compact, INPUTS_ATTR, {}), args.batch, args.seq)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    models: dict[str, Callable[..., Any]] = {"compact": compact}
    if args.against is not None:
        models["dense"] = _dense_model(args.against)
    rows = []
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        fns = {name: (torch.compile(m) if mode == "compiled" else m) for name, m in models.items()}
        calls: dict[str, Callable[[], object]] = {
            n: functools.partial(f, **inputs) for n, f in fns.items()
        }
        times = interleaved_medians(calls, args.reps)
        for name, seconds in times.items():
            ratio = times["dense"] / seconds if "dense" in times else None
            rows.append({"mode": mode, "model": name, "ms": seconds * 1e3, "speedup": ratio})
    print(
        f"batch {args.batch}, sequence {args.seq}, {args.threads} thread(s), median of "
        f"{args.reps} interleaved runs"
    )
    for r in rows:
        extra = f"  {r['speedup']:.2f}x vs dense" if r["speedup"] is not None else ""
        print(f"{r['mode']:>9} {r['model']:>8}: {r['ms']:9.2f} ms{extra}")
    return 0


def _latency_shape(text: str | None) -> tuple[int, ...] | None:
    """'8x128' -> (8, 128); None stays None (GrainConfig's default)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise CLIError(
            f"--latency-shape must be BATCHxSEQUENCE, e.g. 8x128, got {text!r}"
        ) from None


def _ema_beta(text: str) -> float | str:
    """A number, or the text itself ('auto'; anything else GrainConfig refuses in one line)."""
    try:
        return float(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (CLIError, PassError) as exc:
        print(f"grainfx {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grainfx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compress",
        help="prune a fine-tuned classifier (CSV / JSONL rows) or a causal language model (text)",
    )
    c.add_argument("model_dir", type=Path, nargs="?", help="a save_pretrained folder")
    c.add_argument(
        "--task",
        default="classification",
        help=f"one of {', '.join(TASKS)} (default classification)",
    )
    c.add_argument(
        "--data",
        type=Path,
        help="training rows: .csv or .jsonl; for causal-lm plain text (one "
        "document a line) or .jsonl",
    )
    c.add_argument("--eval-data", type=Path, help="held-out rows (default: a split of --data)")
    c.add_argument("--eval-split", type=float, default=0.1, help="held-out share of --data")
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--sparsity", type=float, default=0.9, help="share of encoder removed")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument(
        "--demo", action="store_true", help="MiniLM fine-tuned on the offline Rotten Tomatoes data"
    )
    c.add_argument("--epochs", type=float, help="passes over --data (default 20; --demo 2)")
    c.add_argument("--steps", type=int, help="exact number of steps (overrides --epochs)")
    c.add_argument(
        "--learning-rate", type=float, help="AdamW learning rate (default 3e-5; --demo 1e-4)"
    )
    c.add_argument("--temperature", type=float, help="distillation temperature (default 8)")
    c.add_argument(
        "--structure-alpha", type=float, help="structure regularization strength (default 0.3)"
    )
    c.add_argument(
        "--ema-beta",
        type=_ema_beta,
        help="EMA factor of the importance scores, or 'auto' (a few horizons per "
        "pruning window, the default; the paper's is 0.998)",
    )
    c.add_argument(
        "--granularity",
        choices=["intra", "head"],
        help="intra: query/value units and FFN neurons (default); head: whole heads",
    )
    c.add_argument(
        "--latency-aware",
        action="store_true",
        help="rank query units by importance per unit of latency (priced on this machine): "
        "fewer, fuller heads, a faster compact model",
    )
    c.add_argument(
        "--latency-shape",
        help="BATCHxSEQUENCE the compact model will serve: how heads are grouped into "
        "attention calls is timed at it, and --latency-aware prices heads at it "
        "(default 8x128)",
    )
    c.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="texts per step, over all processes and micro-batches (batched by similar "
        "length, to pad little)",
    )
    c.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens per text, at most (and at most the model's positions)",
    )
    c.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="micro-batches per step (gradient accumulation): each process reads "
        "--batch-size / (processes x accumulate) texts at a time",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the split, order and dropout")
    c.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    c.add_argument(
        "--checkpoint", type=Path, help="checkpoint file (default: OUT.checkpoint.pt beside --out)"
    )
    c.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="save a checkpoint every N steps (and on Ctrl-C)",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoint of an interrupted run (same settings)",
    )
    c.add_argument(
        "--check",
        action="store_true",
        help="run the preflight alone (settings, locations, free space, every data "
        "row and label, the model captured on one batch) and exit",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(run=cmd_compress)

    p = sub.add_parser(
        "predict",
        help="label names and scores of texts, with an output folder "
        "of compress (torch and tokenizers only)",
    )
    p.add_argument("folder", type=Path, help="an --out folder of grainfx compress")
    p.add_argument(
        "--data",
        type=Path,
        help=".csv / .jsonl rows (accuracy too when they have labels); default: "
        "text lines on stdin",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write the predictions to this .csv / .jsonl (default: print them, tab-separated)",
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=cmd_predict)

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
