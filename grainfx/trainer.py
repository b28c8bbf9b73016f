"""The GRAIN training loop: distillation, gradient separation, importance, pruning."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import fx

import passes
from grainfx import distributed
from grainfx.config import GrainConfig
from grainfx.distill import KD_POSITIONS, HiddenMaps, kd_loss, logits_mask
from grainfx.importance import Importance, all_finite
from grainfx.schedule import density_at, lr_factor
from passes.instrument import mask_buffers

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("grainfx")


class TrainingDivergedError(RuntimeError):
    """Too many steps in a row had non-finite losses or gradients."""


@dataclass
class History:
    """What the loop did: one entry per step."""

    steps: int = 0
    skipped: int = 0
    kd_loss: list[float] = field(default_factory=list)
    hidden_loss: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Student:
    """The instrumented graphs being pruned: train-mode (dropout live) and eval-mode, sharing
    parameters and masks."""

    train: fx.GraphModule
    eval: fx.GraphModule
    structure: passes.Structure
    eval_structure: passes.Structure
    hidden_keys: list[str]
    input_names: list[str]


class Trainer:
    """Runs GRAIN on ``student`` distilled from ``teacher`` (a callable returning a dict).

    Inside an initialised torch.distributed process group, the student's train graph and the
    hidden-state maps run under DistributedDataParallel, and the mask gradients and losses are
    averaged over the ranks before they reach the importance scores (see
    :mod:`grainfx.distributed`).
    """

    def __init__(
        self,
        student: Student,
        teacher: Callable[..., Mapping[str, torch.Tensor]],
        config: GrainConfig,
        target_density: float,
        output: str,
        total_steps: int,
        hidden_dims: tuple[int, int] | None,
        prices: Mapping[str, float] | None = None,
    ):
        """``prices``: the latency prices of the heads (see :class:`Importance`); measured
        here when not given."""
        self.student, self.teacher, self.config = student, teacher, config
        self.target, self.output, self.total = target_density, output, total_steps
        self.importance = Importance(student.structure, config, total_steps, prices)
        if self.importance.prices:  # measured on each rank: every rank must rank alike
            names = sorted(self.importance.prices)
            (mean,) = distributed.average(
                [torch.tensor([self.importance.prices[n] for n in names], dtype=torch.float64)]
            )
            self.importance.prices = dict(zip(names, mean.tolist(), strict=True))
        self.masks = mask_buffers(student.train)
        use_hidden = config.hidden_loss and student.hidden_keys
        self.maps = (
            HiddenMaps(len(student.hidden_keys), *hidden_dims)
            if use_hidden and hidden_dims is not None
            else None
        )
        params = [p for p in student.train.parameters() if p.requires_grad]
        if self.maps is not None:
            params += list(self.maps.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.params = params
        self.rank, self.world = distributed.world()
        self.device = next(iter(self.masks.values())).device
        # the forward calls: through DistributedDataParallel in a process group
        self.train_forward = distributed.wrap(student.train)
        self.maps_forward = distributed.wrap(self.maps) if self.maps is not None else None
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.learning_rate,
            eps=config.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, config.warmup)
        )
        self.history = History()
        self.bad_in_a_row = 0
        self.warned_flat = False

    def losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logit KD loss and the (weighted) hidden-state loss, or None, of one batch."""
        inputs = {k: v for k, v in batch.items() if k != KD_POSITIONS}
        with torch.no_grad():
            teacher_out = self.teacher(**inputs)
        out = self.train_forward(**inputs)
        mask = batch.get("attention_mask")
        positions = batch.get(KD_POSITIONS)
        kd = kd_loss(
            out[self.output],
            teacher_out[self.output],
            self.config.temperature,
            positions if positions is not None else logits_mask(batch),
        )
        hidden = None
        if self.maps_forward is not None:
            keys = self.student.hidden_keys
            hidden = self.maps_forward([out[k] for k in keys], [teacher_out[k] for k in keys], mask)
            hidden = hidden * self.config.hidden_loss_weight
        return kd, hidden

    def _backward(self, kd: torch.Tensor, hidden: torch.Tensor | None) -> dict:
        """Weight gradients from both losses; mask gradients from the logit loss alone
        (gradient separation) or from both (ablation). Returns the mask gradients."""
        total = kd if hidden is None else kd + hidden
        with passes.record_mask_grads(self.student.train) as grads:
            if self.config.gradient_separation and hidden is not None:
                # mask gradients only: no weight gradients are computed on this pass
                torch.autograd.grad(kd, list(self.masks.values()), retain_graph=True)
            else:
                total.backward()
        if self.config.gradient_separation and hidden is not None:
            total.backward()
        return dict(grads)

    def _micro_steps(
        self, batches: Sequence[Mapping[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Forward and backward over the micro-batches of one step, each loss scaled by
        1 / their count: the weight gradients accumulate in ``.grad`` (averaged over the ranks
        on the last one); returns the mean KD and hidden losses and the summed mask gradients
        of this rank."""
        count = len(batches)
        kd_sum: torch.Tensor = torch.zeros((), device=self.device)
        hidden_sum: torch.Tensor | None = None
        grads: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with self._no_sync(i < count - 1):
                kd, hidden = self.losses(batch)
                kd = kd / count
                hidden = hidden / count if hidden is not None else None
                for name, grad in self._backward(kd, hidden).items():
                    grads[name] = grads[name] + grad if name in grads else grad
            kd_sum = kd_sum + kd.detach()
            if hidden is not None:
                hidden_sum = hidden.detach() if hidden_sum is None else hidden_sum + hidden.detach()
        return kd_sum, hidden_sum, grads

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """Within: DistributedDataParallel keeps this backward's weight gradients local (the
        micro-batches before the last of a step)."""
        stack = contextlib.ExitStack()
        if skip:
            for module in (self.train_forward, self.maps_forward):
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def step(self, index: int, *batches: Mapping[str, torch.Tensor]) -> None:
        """One optimizer step over ``batches`` (``config.accumulate`` micro-batches; one
        batch without accumulation), importance update and (in the pruning phase) mask
        update."""
        if not batches:
            raise ValueError("Trainer.step needs at least one batch")
        if self.world > 1:
            # dropout: another draw on every rank and step, the same after a resume
            torch.manual_seed((self.config.seed * 1_000_003 + index) * self.world + self.rank)
        kd, hidden, grads = self._micro_steps(batches)
        for m in self.masks.values():
            m.grad = None
        names = list(grads)
        shared = distributed.average(
            [kd, *([hidden] if hidden is not None else []), *grads.values()]
        )
        kd = shared[0]
        hidden = shared[1] if hidden is not None else None
        grads = dict(zip(names, shared[len(shared) - len(names) :], strict=True))
        finite = all_finite([kd, hidden] + [p.grad for p in self.params] + list(grads.values()))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.history.skipped += 1
            self.bad_in_a_row += 1
            warnings.warn(
                f"step {index}: non-finite loss or gradients, step skipped",
                RuntimeWarning,
                stacklevel=2,
            )
            if self.bad_in_a_row >= self.config.max_bad_steps:
                raise TrainingDivergedError(
                    f"{self.bad_in_a_row} steps in a row had non-finite losses or gradients; "
                    f"lower GrainConfig.learning_rate or check the inputs for inf/nan"
                )
            self.scheduler.step()
            return
        self.bad_in_a_row = 0
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        current = {name: m.detach() for name, m in self.masks.items()}
        self.importance.update(grads, current)
        progress = (index + 1) / self.total
        if progress > self.config.prune_start and (index + 1) % self.config.prune_every == 0:
            goal = density_at(progress, self.target, self.config.prune_start, self.config.prune_end)
            if goal < 1.0 and not self.warned_flat and self.importance.is_flat(index + 1):
                self.warned_flat = True
                warnings.warn(
                    "importance scores are all ~0 as pruning starts: the student matches the "
                    "teacher exactly (a model without dropout distilled from itself has no "
                    "gradient), so the ranking is arbitrary; keep the model's dropout on or "
                    "give a different teacher",
                    RuntimeWarning,
                    stacklevel=2,
                )
            passes.set_masks(self.student.train, self.importance.prune(current, goal))
            distributed.check_same_masks(self.masks, index + 1)
        self.history.kd_loss.append(kd.item())
        self.history.hidden_loss.append(hidden.item() if hidden is not None else 0.0)
        self.history.density.append(self.student.structure.density(self.masks))
        self.history.steps += 1

    def run(
        self,
        batches: Iterable[Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]],
        progress: bool = True,
        start: int = 0,
        callback: Callable[[int, dict], None] | None = None,
        save: Callable[[int], object] | None = None,
        save_every: int | None = None,
    ) -> History:
        """Train over ``batches`` (the steps from ``start`` to ``total_steps``: one batch, or
        a list of the micro-batches, each), with a progress bar (on rank 0); ``callback`` gets
        the step index and the current masks after every step.

        ``save(steps_done)`` is called every ``save_every`` steps and when the run is
        interrupted (Ctrl-C, or KeyboardInterrupt from ``callback``). In the main thread a
        Ctrl-C lets the current step finish first, so the saved state is whole; a second
        Ctrl-C stops at once. In a process group the ranks agree after every step whether any
        was interrupted, so all stop after the same step.
        """
        from tqdm.auto import tqdm

        began = time.perf_counter()
        self.student.train.train()
        bar = tqdm(
            total=self.total,
            initial=start,
            disable=not progress or self.rank != 0,
            desc="grain",
            unit="step",
            dynamic_ncols=True,
        )
        done = start
        try:
            with _deferred_interrupt() as interrupted:
                for index, batch in enumerate(batches, start=start):
                    self.step(index, *(batch if isinstance(batch, Sequence) else [batch]))
                    done = index + 1
                    if callback is not None:
                        callback(index, {k: m.detach().clone() for k, m in self.masks.items()})
                    self._show(bar)
                    if distributed.any_rank(interrupted(), self.device):
                        raise KeyboardInterrupt
                    if (
                        save is not None
                        and save_every
                        and done % save_every == 0
                        and done < self.total
                    ):
                        save(done)
        except KeyboardInterrupt:
            if save is not None and done > start:
                log.warning("interrupted after step %d: saving a checkpoint", done)
                save(done)
            raise
        finally:
            bar.close()
            self.history.seconds += time.perf_counter() - began
        log.info(
            "trained %d steps (%d skipped) in %.1f s",
            self.history.steps,
            self.history.skipped,
            self.history.seconds,
        )
        return self.history

    def _show(self, bar: tqdm) -> None:
        h = self.history
        if h.kd_loss:
            bar.set_postfix(
                density=f"{h.density[-1]:.3f}",
                kd=f"{h.kd_loss[-1]:.4f}",
                hidden=f"{h.hidden_loss[-1]:.4f}",
                refresh=False,
            )
        bar.update(1)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Within: the first SIGINT only sets a flag (read by calling the yielded function), the
    second raises KeyboardInterrupt. Outside the main thread, signals are left alone."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)
        log.warning("Ctrl-C: stopping after this step (press again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, previous)
