"""Serialize: write a compact GraphModule to a ``.pt2`` file and load it back with torch only.

The module is re-exported with ``torch.export`` (dynamic batch and sequence) and written with
``torch.export.save``; a JSON of the kept structure is stored inside the archive and beside it
(``model.pt2`` -> ``model.json``). Files are written under a temporary name and renamed, so a
crash never leaves a half-written model. Loading needs neither transformers nor grainfx's model
code, and runs nothing from the file: nothing in an archive grainfx writes needs unpickling
(weights as raw tensors, no sample inputs), and :func:`load` refuses, before torch reads it, any
archive that holds something else (:mod:`passes.archive`).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import fx

from passes.archive import check_archive
from passes.capture import EXAMPLE_INPUTS_ATTR, dynamic_shapes_for
from passes.errors import (
    CorruptModelFileError,
    LoadError,
    ModelFileNotFoundError,
    SaveError,
)
from passes.record import InputSpec, KeptStructure, input_specs, to_plain
from passes.rewrite import KEPT_ATTR

STRUCTURE_FILE = "grainfx_structure.json"
#: The attribute of a loaded module that holds the specs of its inputs (every saved module has
#: them; ``grainfx_kept`` only modules that rewrite made).
INPUTS_ATTR = "grainfx_inputs"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place, with the
    permissions the umask gives: a failed write (a full disk) leaves the old file as it was."""
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SaveError(
            f"could not write {path}: {exc.strerror or exc}; free some space or "
            f"choose another folder (the previous file, if any, is unchanged)"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(gm: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``gm`` (a module returned by the passes) to ``path`` (.pt2) and its JSON beside it.

    Returns the path written. Raises SaveError when the module cannot be re-exported.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise SaveError(f"{path} must end in .pt2 (torch.export's archive format)")
    inputs = getattr(gm, EXAMPLE_INPUTS_ATTR, None)
    if inputs is None:
        raise SaveError(
            "this module carries no example inputs: save modules returned by "
            "passes.capture / instrument / rewrite (or grainfx.compress)"
        )
    try:
        ep = torch.export.export(
            gm, (), dict(inputs), strict=False, dynamic_shapes=dynamic_shapes_for(inputs)
        )
    except Exception as exc:
        raise SaveError(f"re-export of the module failed: {exc}".splitlines()[0]) from exc
    kept = getattr(gm, KEPT_ATTR, None)
    record = (
        kept.with_inputs(inputs).to_dict()
        if isinstance(kept, KeptStructure)
        else {"inputs": to_plain({name: InputSpec.of(t) for name, t in inputs.items()})}
    )
    _write(ep, path, json.dumps(record, indent=2))
    return path


def _write(ep: torch.export.ExportedProgram, path: Path, kept: str) -> None:
    """Write ``ep`` without its sample inputs (torch pickles them) and check that the archive
    is one :func:`load` accepts, then ``kept`` beside it."""
    ep.example_inputs = None  # the record holds their specs
    buffer = io.BytesIO()  # serialized in memory: torch's file writer aborts on a full disk
    torch.export.save(ep, buffer, extra_files={STRUCTURE_FILE: kept})
    data = buffer.getvalue()
    try:
        check_archive(data, str(path))
    except LoadError as exc:
        raise SaveError(f"the archive of this module could not be loaded safely: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    _atomic_write(path.with_suffix(".json"), kept.encode())


def load(path: str | os.PathLike) -> torch.nn.Module:
    """Load a module written by :func:`save`; call it as ``module(**inputs)``.

    The file is read once and checked before torch reads it (:func:`passes.archive.
    check_archive`): nothing in it is unpickled or evaluated. The kept structure is available
    as ``module.grainfx_kept`` (a :class:`~passes.record.KeptStructure`, checked as it is read),
    the specs of its inputs as ``module.grainfx_inputs``.

    Raises:
        ModelFileNotFoundError: no file at ``path``.
        CorruptModelFileError: the file is truncated or not a grainfx .pt2 archive.
        UnsafeModelFileError: the file holds something loading would run (a pickled member,
            code in the program's strings, a member grainfx does not write).
    """
    path = Path(path)
    _require_file(path)
    data = path.read_bytes()
    check_archive(data, str(path))
    extra = {STRUCTURE_FILE: ""}
    try:  # the bytes checked, not the file again
        ep = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as exc:
        raise CorruptModelFileError(
            f"{path} is not a readable .pt2 model ({type(exc).__name__}); it may be truncated "
            f"or written by something else: save it again with grainfx.save"
        ) from exc
    try:
        record = json.loads(extra[STRUCTURE_FILE] or "{}")
        kept = KeptStructure.from_dict(record) if "layers" in record else None
        specs = dict(kept.inputs) if kept is not None else input_specs(record.get("inputs", {}))
    except (ValueError, TypeError, AttributeError) as exc:
        raise CorruptModelFileError(f"{path} holds a damaged structure record ({exc})") from exc
    # inputs of the recorded shapes: the module's shape guards are built from them, as from
    # the sample inputs torch would have pickled
    ep.example_inputs = (
        (),
        {k: torch.zeros(s.shape, dtype=s.torch_dtype) for k, s in specs.items()},
    )
    module = ep.module()
    setattr(module, INPUTS_ATTR, specs)
    if kept is not None:
        setattr(module, KEPT_ATTR, kept)
    return module


def resave(path: str | os.PathLike, *, trust: bool = False) -> Path:
    """Rewrite a ``.pt2`` that :func:`load` refuses (an output of grainfx 0.2 or older, which
    pickled its sample inputs) in place, in the form :func:`load` accepts.

    This reads the file with ``torch.export.load``, which unpickles and evaluates parts of it:
    pass ``trust=True`` only for a file you made or trust. Returns ``path``.
    """
    if not trust:
        raise LoadError(
            "resave unpickles the file, which can run code from it: pass trust=True only for "
            "a file you made or trust"
        )
    path = Path(path)
    _require_file(path)
    extra = {STRUCTURE_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise CorruptModelFileError(f"{path} is not a readable .pt2 model: {exc}") from exc
    _write(ep, path, extra[STRUCTURE_FILE] or "{}")
    return path


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ModelFileNotFoundError(
            f"no model file at {path}: check the path (grainfx.save writes a .pt2 file)"
        )
