"""Checks that run before the first training step, so that a run fails in seconds, not hours.

``grainfx.compress`` checks its checkpoint location; the command line also checks the output
folder, reads and maps every data row (:mod:`grainfx.rows`), checks the model folder (an
architecture of its ``--task``, no parameter left to start at random, a tokenizer that fits
the embeddings: ``grainfx.cli._model``), and stops at the first problem with one line that
names it and the fix. Capture, discover and the teacher's compatibility are
checked on one real batch by ``compress`` itself before its progress bar starts
(:func:`grainfx.compress.prepare`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from passes.errors import PassError

#: A checkpoint holds the weights and AdamW's two moments (3x the model); the new one is
#: written beside the old one before it replaces it.
CHECKPOINT_COPIES = 6


class PreflightError(PassError, OSError):
    """A location that cannot be written or lacks the free space the run needs."""


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the one a ``mkdir -p`` writes into)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def writable_folder(folder: str | os.PathLike, what: str, fix: str) -> Path:
    """Check that files can be created in ``folder`` (or, when it does not exist yet, in the
    nearest ancestor that does) by creating and removing one; returns that existing folder.

    ``what`` names the file for the message (``"the output --out demo"``), ``fix`` says what
    to change (``"choose another --out"``).
    """
    existing = _existing(Path(folder))
    if not existing.is_dir():
        raise PreflightError(f"cannot write {what}: {existing} is a file, not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".grainfx-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(
            f"cannot write {what}: {existing} is not writable "
            f"({exc.strerror}); {fix} or make the folder writable"
        ) from None
    return existing


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Disk space a checkpoint of ``model`` may take while it is saved."""
    return CHECKPOINT_COPIES * model_bytes(model)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError(n)


def free_space(needs: Iterable[tuple[str | os.PathLike, int, str]], fix: str) -> None:
    """Check the free disk space for files about to be written.

    ``needs``: (folder, bytes to write there, what they are) for each; needs on the same file
    system add up.
    """
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for folder, size, what in needs:
        existing = _existing(Path(folder))
        device = existing.stat().st_dev
        _, total, whats = by_device.get(device, (existing, 0, []))
        by_device[device] = (existing, total + size, whats + [what])
    for existing, need, whats in by_device.values():
        free = shutil.disk_usage(existing).free
        if free < need:
            raise PreflightError(
                f"not enough free disk space in {existing}: {_size(free)} free, about "
                f"{_size(need)} needed for {' and '.join(whats)}; free some space or {fix}"
            )
