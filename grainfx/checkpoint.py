"""Checkpoints of a compress run: everything needed to go on from a step as if never stopped.

A checkpoint holds the student's weights and masks, the hidden-state maps, the optimizer and
learning-rate schedule, the importance scores (and their random generator), the history, the
step and torch's random state (dropout). It is written to a temporary name (one per process)
and renamed, so a crash while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grainfx.config import ConfigError
from grainfx.trainer import History, Trainer
from passes.errors import PassError

FORMAT = "grainfx-checkpoint"
VERSION = 1


class CheckpointError(PassError, ValueError):
    """A checkpoint cannot be used: missing, unreadable, or written by another run; or
    cannot be written (``reason``: why, as the system says it)."""

    reason: str | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often :func:`grainfx.compress` saves its state.

    ``path``: the checkpoint file; ``every``: save after every ``every`` steps (and when
    interrupted with Ctrl-C); ``resume``: go on from ``path`` (it must exist); ``identity``:
    what else must be the same to resume, as names and content hashes (the command line puts
    the data files and the tokenizer here: ``{"--data file": "sha256:..."}``); a checkpoint
    whose identity differs is refused, naming what changed.
    """

    path: Path
    every: int = 100
    resume: bool = False
    identity: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise ConfigError(f"checkpoint path must be a path, got {self.path!r}")
        object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"checkpoint every must be an integer >= 1, got {self.every!r}")
        if not isinstance(self.identity, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.identity.items()
        ):
            raise ConfigError(
                f"checkpoint identity must map names to strings (hashes), got {self.identity!r}"
            )
        object.__setattr__(self, "identity", dict(self.identity))
        if self.resume and not self.path.is_file():
            raise CheckpointError(
                f"no checkpoint at {self.path} to resume from: run without "
                f"resume (--resume) to start from the beginning"
            )


def _fingerprint(trainer: Trainer) -> dict:
    return {
        "config": trainer.config.to_dict(),
        "target_density": trainer.target,
        "total_steps": trainer.total,
        "world_size": trainer.world,
        "masks": {k: list(v.shape) for k, v in trainer.masks.items()},
    }


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:19]


def temporary(path: Path) -> Path:
    """The name ``path`` is written under before it is renamed into place: one per process,
    so that two runs on one checkpoint path never write (or remove) each other's file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of ``path`` that killed processes left behind."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) in (0, os.getpid()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: nobody is writing it
            stale.unlink(missing_ok=True)
        except OSError:  # another user's live process, or a file not ours to remove
            pass


def save(
    trainer: Trainer, steps_done: int, path: Path, identity: Mapping[str, str] | None = None
) -> Path:
    """Write the state of ``trainer`` after ``steps_done`` steps to ``path`` (atomically);
    ``identity``: see :class:`CheckpointConfig`."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "steps_done": steps_done,
        "run": _fingerprint(trainer),
        "identity": dict(identity or {}),
        "student": trainer.student.train.state_dict(),
        "maps": trainer.maps.state_dict() if trainer.maps is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "importance": trainer.importance.state_dict(),
        "history": dataclasses.asdict(trainer.history),
        "counters": {"bad_in_a_row": trainer.bad_in_a_row, "warned_flat": trainer.warned_flat},
        "rng": torch.get_rng_state(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    # serialized in memory, then written by Python: torch's archive writer, when a write to
    # a file fails (a full disk), aborts the process as it is freed (its destructor throws)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        error = CheckpointError(
            f"cannot write the checkpoint {path} ({reason}): free disk "
            f"space or choose another checkpoint path (--checkpoint); the "
            f"previous checkpoint is intact"
        )
        error.reason = reason
        raise error from None
    _remove_stale(path)
    return path


def read(path: Path, identity: Mapping[str, str] | None = None) -> dict:
    """The state saved in ``path``, read once before anything is built: refused unless it
    is a grainfx checkpoint of this version written on the same ``identity`` (data files,
    tokenizer: see :class:`CheckpointConfig`). :func:`prices` and :func:`load` take it."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable grainfx checkpoint ({exc})".splitlines()[0]
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a grainfx checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a version {state.get('version')} checkpoint; this "
            f"grainfx reads version {VERSION}"
        )
    theirs, mine = state.get("identity", {}), dict(identity or {})
    changed = [k for k in sorted({*theirs, *mine}) if theirs.get(k) != mine.get(k)]
    if changed:
        detail = "; ".join(
            f"{k}: {_short(theirs.get(k))} there, {_short(mine.get(k))} now" for k in changed
        )
        raise CheckpointError(
            f"{path} was written by a run on other inputs "
            f"({', '.join(changed)} changed: {detail}): resume with the same "
            f"files, or start again without resume (--resume)"
        )
    return state


def check(path: Path, identity: Mapping[str, str] | None = None) -> int:
    """Check, before anything is built, that ``path`` can be resumed from with these inputs
    (see :func:`read`); returns its number of steps done."""
    return read(path, identity)["steps_done"]


def prices(state: dict) -> dict[str, float] | None:
    """The latency prices of the heads in a checkpoint's ``state`` (from :func:`read`; None
    when the run was not latency-aware), so that a resumed run need not measure them again."""
    return state["importance"].get("prices") or None


def load(trainer: Trainer, state: dict, path: Path) -> int:
    """Restore ``trainer`` from a checkpoint's ``state`` (from :func:`read`; ``path`` names
    it in errors); returns the number of steps already done.

    Raises CheckpointError when the checkpoint was written by a run with other settings
    (config, sparsity, length or model structure).
    """
    mine = _fingerprint(trainer)
    for key, value in mine.items():
        theirs = state["run"].get(key)
        if theirs != value:
            detail = key.replace("_", " ")
            if key == "world_size":
                detail = f"{theirs} processes there, {value} now"
            if key == "config":
                detail = ", ".join(
                    f"{k}={theirs.get(k)!r} there, {v!r} now"
                    for k, v in value.items()
                    if theirs.get(k) != v
                )
            raise CheckpointError(
                f"{path} was written by another run ({detail}): resume with "
                f"the same model, data and settings, or start again without resume"
            )
    trainer.student.train.load_state_dict(state["student"])
    if trainer.maps is not None:
        trainer.maps.load_state_dict(state["maps"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.importance.load_state_dict(state["importance"])
    trainer.history = History(**state["history"])
    trainer.bad_in_a_row = state["counters"]["bad_in_a_row"]
    trainer.warned_flat = state["counters"]["warned_flat"]
    torch.set_rng_state(state["rng"])
    return state["steps_done"]
