"""Serialize: write a compact GraphModule to a ``.pt2`` file and load it back with torch only.

The module is re-exported with ``torch.export`` (dynamic batch and sequence) and written with
``torch.export.save``; a JSON of the kept structure is stored inside the archive and beside it
(``model.pt2`` -> ``model.json``). Files are written under a temporary name and renamed, so a
crash never leaves a half-written model. Loading needs neither transformers nor grainfx's model
code.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import fx

from passes.capture import EXAMPLE_INPUTS_ATTR, dynamic_shapes_for
from passes.errors import CorruptModelFileError, ModelFileNotFoundError, SaveError
from passes.rewrite import KEPT_ATTR

STRUCTURE_FILE = "grainfx_structure.json"


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


def _input_spec(t: torch.Tensor) -> dict:
    """Shape and dtype of an example input (and the largest value of integer ones, so that
    benchmarks can draw valid token ids)."""
    spec: dict[str, object] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if not t.dtype.is_floating_point and t.numel():
        spec["max"] = int(t.max())
    return spec


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
    record = dict(getattr(gm, KEPT_ATTR, {}))
    record["inputs"] = {name: _input_spec(t) for name, t in inputs.items()}
    kept = json.dumps(record, indent=2)
    buffer = io.BytesIO()  # serialized in memory: torch's file writer aborts on a full disk
    torch.export.save(ep, buffer, extra_files={STRUCTURE_FILE: kept})
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, buffer.getvalue())
    _atomic_write(path.with_suffix(".json"), kept.encode())
    return path


def load(path: str | os.PathLike) -> torch.nn.Module:
    """Load a module written by :func:`save`; call it as ``module(**inputs)``.

    The kept structure is available as ``module.grainfx_kept``.

    Raises:
        ModelFileNotFoundError: no file at ``path``.
        CorruptModelFileError: the file is truncated or not a grainfx .pt2 archive.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(
            f"no model file at {path}: check the path (grainfx.save writes a .pt2 file)"
        )
    extra = {STRUCTURE_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
        module = ep.module()
    except Exception as exc:
        raise CorruptModelFileError(
            f"{path} is not a readable .pt2 model ({type(exc).__name__}); it may be truncated "
            f"or written by something else: save it again with grainfx.save"
        ) from exc
    try:
        kept = json.loads(extra[STRUCTURE_FILE]) if extra[STRUCTURE_FILE] else {}
    except json.JSONDecodeError as exc:
        raise CorruptModelFileError(f"{path} holds a damaged structure record") from exc
    setattr(module, KEPT_ATTR, kept)
    return module
