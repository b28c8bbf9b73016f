"""compress(): capture -> discover -> instrument -> GRAIN training -> rewrite."""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import torch
from torch import fx

import passes
from grainfx import buckets, distributed, preflight
from grainfx import checkpoint as checkpoints
from grainfx.checkpoint import CheckpointConfig, CheckpointError
from grainfx.config import ConfigError, GrainConfig
from grainfx.distill import KD_POSITIONS
from grainfx.output import open_permissions
from grainfx.report import build_report, format_report
from grainfx.trainer import Student, Trainer
from passes.capture import OUTPUT_NAMES_ATTR
from passes.errors import CaptureError, PassError
from passes.factorize import factorize_embedding
from passes.instrument import mask_buffers
from passes.rewrite import KEPT_ATTR

#: Batch entries that are labels: distillation does not use them.
LABEL_KEYS = ("labels", "label")
#: Label value of positions that carry none (Hugging Face's convention).
IGNORE_INDEX = -100
HIDDEN_PREFIX = "grain.hidden."

log = logging.getLogger("grainfx")


class EmptyDataLoaderError(PassError, ValueError):
    """The dataloader yields no batch."""


class BatchError(PassError, ValueError):
    """A batch is not something the model can take."""


class TeacherMismatchError(PassError, ValueError):
    """The teacher's outputs do not match the student's."""


@dataclass
class CompressionResult:
    """What :func:`compress` returns.

    ``module``: the compact GraphModule (call it like the model, it returns a dict);
    ``density``: kept share of encoder (unit) parameters, measured on ``module``;
    ``report``: per layer heads, query and value units per head and FFN width, parameters
    before and after, steps, losses and time; ``structure``: what discover found;
    ``masked``: the trained eval-mode student with its masks, the graph ``module`` was
    rewritten from; ``masks``: the final binary masks; ``scores``: the final smoothed
    importance scores.
    """

    module: fx.GraphModule
    density: float
    report: dict
    structure: passes.Structure = field(repr=False)
    masked: fx.GraphModule | None = field(default=None, repr=False)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write the model (``.pt2``), its kept structure (``.json``) and the report
        (``.report.json``) beside each other, with the permissions the umask gives."""
        path = passes.save(self.module, path)
        path.with_suffix(".report.json").write_text(json.dumps(self.report, indent=1))
        open_permissions(path, path.with_suffix(".json"))
        return path

    def __str__(self) -> str:
        return format_report(self.report)


def _model_inputs(
    batch: object, names: list[str] | None = None, positions: bool = False
) -> dict[str, torch.Tensor]:
    """The model's keyword inputs from one dataloader batch (labels dropped); with
    ``positions``, per-token labels give the positions to distil (:data:`KD_POSITIONS`)."""
    if not isinstance(batch, Mapping):
        raise BatchError(
            f"batches must be dicts of tensors keyed by the model's argument names (as a "
            f"tokenizer returns them), got {type(batch).__name__}; wrap your collate_fn to "
            f"return e.g. {{'input_ids': ..., 'attention_mask': ...}}"
        )
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    bad = [k for k, v in inputs.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BatchError(
            f"batch entry {bad[0]!r} is not a tensor; return tensors from the "
            f"collate_fn (return_tensors='pt')"
        )
    if names is not None:
        missing = [n for n in names if n not in inputs]
        if missing:
            raise BatchError(
                f"a batch lacks {missing}, which the first batch had; every "
                f"batch must hold the same keys"
            )
        inputs = {n: inputs[n] for n in names}
    labels = batch.get("labels")
    if positions and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        inputs[KD_POSITIONS] = labels != IGNORE_INDEX
    return inputs


def steps_of(batches: Iterator, size: int) -> Iterator[list]:
    """The batches of ``batches`` in lists of ``size`` (the micro-batches of one step); a
    short last list is dropped."""
    while True:
        step = list(itertools.islice(batches, size))
        if len(step) < size:
            return
        yield step


def cycle(dataloader: Iterable, total: int) -> Iterator:
    """Batches of ``dataloader``, re-iterated as often as needed, ``total`` in all. A sampler
    with ``set_epoch`` (a DistributedSampler) gets the pass's number before each pass, so that
    it shuffles every pass anew."""
    count = 0
    set_epoch = getattr(getattr(dataloader, "sampler", None), "set_epoch", None)
    for epoch in itertools.count():
        if count >= total:
            return
        if set_epoch is not None:
            set_epoch(epoch)
        before = count
        for batch in dataloader:
            yield batch
            count += 1
            if count == total:
                return
        if count == before:
            raise EmptyDataLoaderError(
                "the dataloader yielded no batch when iterated again: compress needs a "
                "re-iterable dataloader (a torch DataLoader or a list), not a one-shot iterator"
            )


def _first_batch(dataloader: Iterable) -> dict[str, torch.Tensor]:
    for batch in dataloader:
        return _model_inputs(batch)
    raise EmptyDataLoaderError(
        "the dataloader yielded no batch: give compress a dataloader over at least one example"
    )


Captured = TypeVar("Captured")


def _capture(
    capturing: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Captured],
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    what: str,
) -> Captured:
    """``capturing(model, batch)`` (capture or capture_pair), with a batch the model cannot
    take reported as a BatchError."""
    try:
        return capturing(model, batch)
    except CaptureError:
        try:
            with torch.no_grad():
                model(**batch)
        except Exception as exc:
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise BatchError(
                f"the {what} cannot take the first batch {shapes}: {exc}; check "
                f"that the batch keys are the model's argument names"
            ) from exc
        raise


def _pick_output(names: list[str], config: GrainConfig) -> str:
    if config.output_name is not None:
        if config.output_name not in names:
            raise ConfigError(
                f"output_name {config.output_name!r} is not an output of the "
                f"model; it returns {names}"
            )
        return config.output_name
    if "logits" in names:
        return "logits"
    if len(names) == 1:
        return names[0]
    raise ConfigError(
        f"the model returns {names}: set GrainConfig(output_name=...) to the one to distil"
    )


def _with_hidden(gm: fx.GraphModule, structure: passes.Structure, every: int) -> tuple:
    chosen = structure.layer_outputs[::every]
    keys = [f"{HIDDEN_PREFIX}{i}" for i in range(len(chosen))]
    return passes.expose(gm, dict(zip(keys, chosen, strict=True))), keys


def _width(gm: fx.GraphModule, node_name: str) -> int:
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    return int(node.meta["val"].shape[-1])


def _total_steps(dataloader: Iterable, config: GrainConfig) -> int:
    """The run's optimizer steps: ``steps``, or ``epochs`` passes over the dataloader at
    ``accumulate`` batches a step."""
    if config.steps is not None:
        return config.steps
    try:
        # a dataloader without len() is reported below
        batches = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("the dataloader has no len(): set GrainConfig(steps=...)") from None
    return max(1, math.ceil(config.epochs * batches / config.accumulate))


def prepare(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    sparsity: float,
    *,
    teacher: torch.nn.Module | None,
    config: GrainConfig,
    total_steps: int,
    prices: Mapping[str, float] | None = None,
) -> Trainer:
    """Capture, discover and instrument student and teacher; return the ready Trainer.

    ``batch`` is one batch of model inputs (it fixes the input names of every later batch).
    ``prices``: under ``latency_aware``, the heads' latency prices of an earlier run (a
    checkpoint's); measured when not given.
    """
    eval_gm, train_gm = _capture(passes.capture_pair, model, batch, "model")
    if config.embedding_rank is not None:
        train_gm = factorize_embedding(train_gm, config.embedding_rank)
        eval_gm = factorize_embedding(eval_gm, config.embedding_rank, share_with=train_gm)
    structure = passes.discover(eval_gm)
    log.info(
        "captured %d graph nodes; found %d attention and %d FFN blocks, %s prunable parameters",
        len(eval_gm.graph.nodes),
        len(structure.attention),
        len(structure.ffn),
        f"{structure.unit_params:,}",
    )
    train_structure = passes.discover(train_gm)
    if train_structure.mask_shapes() != structure.mask_shapes():
        raise PassError("the train-mode graph has another structure than the eval-mode one")
    output = _pick_output(getattr(eval_gm, OUTPUT_NAMES_ATTR), config)

    teacher_eval = _capture(
        passes.capture, teacher if teacher is not None else model, batch, "teacher"
    )
    for p in teacher_eval.parameters():
        p.requires_grad_(False)
    student_train, hidden_keys = _with_hidden(train_gm, train_structure, config.hidden_every)
    hidden_dims = None
    if config.hidden_loss:
        teacher_structure = passes.discover(teacher_eval)
        if len(teacher_structure.layer_outputs) != len(train_structure.layer_outputs):
            raise TeacherMismatchError(
                f"the teacher has {len(teacher_structure.layer_outputs) - 1} layers and the "
                f"student {len(train_structure.layer_outputs) - 1}: the hidden-state loss pairs "
                f"layers one to one; use GrainConfig(hidden_loss=False)"
            )
        teacher_eval, _ = _with_hidden(teacher_eval, teacher_structure, config.hidden_every)
        hidden_dims = (
            _width(train_gm, train_structure.layer_outputs[0]),
            _width(teacher_eval, teacher_structure.layer_outputs[0]),
        )
    with torch.no_grad():
        t_out, s_out = teacher_eval(**batch), eval_gm(**batch)
    if output not in t_out or t_out[output].shape != s_out[output].shape:
        got = tuple(t_out[output].shape) if output in t_out else f"no {output!r}"
        raise TeacherMismatchError(
            f"the teacher's {output!r} is {got} but the student's is "
            f"{tuple(s_out[output].shape)}: distillation needs the same "
            f"output shape (same task head and labels)"
        )

    masked_train = passes.instrument(student_train, train_structure)
    masked_eval = passes.instrument(eval_gm, structure, masks=mask_buffers(masked_train))
    student = Student(
        masked_train, masked_eval, train_structure, structure, hidden_keys, list(batch)
    )
    return Trainer(
        student,
        teacher_eval,
        config,
        1.0 - float(sparsity),
        output,
        total_steps,
        hidden_dims,
        prices,
    )


def _check_sparsity(sparsity: object) -> None:
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not (0 <= sparsity < 1)
    ):
        raise ConfigError(
            f"sparsity must be in [0, 1) (0.9 keeps 10% of the encoder), got {sparsity!r}"
        )


def check(
    model: torch.nn.Module,
    dataloader: Iterable,
    sparsity: float,
    *,
    teacher: torch.nn.Module | None = None,
    config: GrainConfig | None = None,
) -> passes.Structure:
    """What :func:`compress` does before its first step, alone: the model and the teacher
    captured, discovered and instrumented on the first batch, the teacher's output checked
    against the student's, and every later batch checked to hold the same inputs. Returns
    what discover found; raises what compress would raise before training."""
    _check_sparsity(sparsity)
    config = config or GrainConfig()
    trainer = prepare(
        model,
        _first_batch(dataloader),
        sparsity,
        teacher=teacher,
        config=config,
        total_steps=_total_steps(dataloader, config),
    )
    for batch in dataloader:
        _model_inputs(batch, trainer.student.input_names)
    return trainer.student.eval_structure


def compress(
    model: torch.nn.Module,
    dataloader: Iterable,
    sparsity: float,
    *,
    teacher: torch.nn.Module | None = None,
    config: GrainConfig | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    checkpoint: CheckpointConfig | None = None,
) -> CompressionResult:
    """Prune ``model`` with GRAIN to ``1 - sparsity`` of its encoder parameters.

    Args:
        model: a (fine-tuned) model the passes can capture; it is copied, never modified.
        dataloader: batches as the model takes them (dicts of tensors; ``labels`` ignored).
        sparsity: share of encoder (unit) parameters to remove, in [0, 1): 0.9 keeps 10%.
            Embeddings, norms and the task head are outside this count.
        teacher: the model to distil from (default: a frozen copy of ``model``).
        config: a :class:`GrainConfig` (default: the paper's settings).
        progress: show a progress bar.
        callback: called after every step with the step index and the current masks.
        checkpoint: a :class:`CheckpointConfig`: its folder is checked for write access and
            free space before anything else; save the run's state every ``every`` steps
            and on Ctrl-C (the KeyboardInterrupt is raised again after saving) and at the end
            (so that a run whose result cannot be written goes on from there; when this last
            one cannot be written, a warning is logged and the result returned), and with
            ``resume`` go on from the saved step. A resumed run ends with the same masks and
            weights as an uninterrupted one when the dataloader yields the same batches in
            the same order (shuffle with a seeded generator, as ``text_batches`` does).

    Several processes: call compress on every rank of an initialised torch.distributed
    process group (torchrun), each with its own share of the data (a DataLoader with a
    DistributedSampler; as many batches on every rank). The ranks train one student together
    (DistributedDataParallel; importance from the mask gradients of all ranks) and end with
    the same masks and weights; rank 0 alone shows progress and writes the checkpoint. Every
    rank returns the result: save it on rank 0 (``torch.distributed.get_rank() == 0``).

    Returns:
        A :class:`CompressionResult` with the compact module, its density and a report.
    """
    _check_sparsity(sparsity)
    config = config or GrainConfig()
    rank, world = distributed.world()
    device = next(iter(model.parameters())).device
    if world > 1:
        distributed.check_backend(device)
    saved = None
    if checkpoint is not None:
        folder = checkpoint.path.parent
        preflight.writable_folder(
            folder,
            f"the checkpoint {checkpoint.path}",
            "choose another checkpoint path (--checkpoint)",
        )
        preflight.free_space(
            [(folder, preflight.checkpoint_bytes(model), "a checkpoint")],
            "choose another checkpoint path (--checkpoint)",
        )
        if checkpoint.resume:
            saved = checkpoints.read(checkpoint.path, checkpoint.identity)
    torch.manual_seed(config.seed)
    batch = _first_batch(dataloader)
    total = _total_steps(dataloader, config)
    distributed.check_same_int(
        total,
        "the number of steps",
        "give every rank as many batches (a DistributedSampler pads the ranks' shares to "
        "equal sizes) or set GrainConfig(steps=...)",
        device,
    )
    # a resumed run ranks with the prices it measured at its start, and need not time them again
    prices = checkpoints.prices(saved) if saved is not None else None
    trainer = prepare(
        model, batch, sparsity, teacher=teacher, config=config, total_steps=total, prices=prices
    )
    names = trainer.student.input_names
    raw = cycle(dataloader, total * config.accumulate)
    start, save = 0, None
    if checkpoint is not None:
        if rank == 0:

            def save(steps_done: int) -> None:
                checkpoints.save(trainer, steps_done, checkpoint.path, checkpoint.identity)

        if saved is not None:
            start = checkpoints.load(trainer, saved, checkpoint.path)
            del saved
            log.info("resuming from %s after step %d of %d", checkpoint.path, start, total)
            rng = torch.get_rng_state()
            # the batches the first run consumed
            for _ in itertools.islice(raw, start * config.accumulate):
                pass
            torch.set_rng_state(rng)
    batches = steps_of(
        (_model_inputs(b, names, config.kd_positions == "labeled") for b in raw),
        config.accumulate,
    )
    history = trainer.run(
        batches,
        progress=progress,
        start=start,
        callback=callback,
        save=save,
        save_every=checkpoint.every if checkpoint else None,
    )
    if save is not None and checkpoint is not None and total > start:
        try:  # a run whose result cannot be written resumes without training again
            save(total)
        except CheckpointError as exc:  # the result in memory is whole: it is still returned
            log.warning(
                "cannot write the final checkpoint %s (%s): the result is kept without it "
                "(any earlier checkpoint is intact)",
                checkpoint.path,
                exc.reason,
            )
    masked_eval, structure = trainer.student.eval, trainer.student.eval_structure
    masked_eval.eval()
    compact = buckets.rewrite(masked_eval, structure, shape=config.latency_shape)
    log.info("rewrote the masked graph into a compact one of %d nodes", len(compact.graph.nodes))
    original = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = build_report(
        getattr(compact, KEPT_ATTR), structure, history, 1.0 - float(sparsity), config, original
    )
    if trainer.importance.prices:
        report["latency_prices"] = dict(trainer.importance.prices)
    report["world_size"] = world
    return CompressionResult(
        module=compact,
        density=report["density"],
        report=report,
        structure=structure,
        masked=masked_eval,
        masks=passes.get_masks(masked_eval),
        scores={k: v.clone() for k, v in trainer.importance.scores.items()},
    )
