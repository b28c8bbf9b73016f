"""Exceptions raised by the graph passes.

Every error names the problem and the fix. Each failure mode has its own type so callers can
catch exactly what they expect; all of them derive from :class:`PassError`.
"""

from __future__ import annotations


class PassError(Exception):
    """Base class of every error raised by :mod:`passes`."""


class CaptureError(PassError):
    """The model could not be captured into a graph (the export error is kept as ``__cause__``)."""


class InvalidInputsError(PassError, TypeError):
    """The example inputs are not what the pass needs (a dict of tensors)."""


class DiscoverError(PassError):
    """The graph holds a pattern that discover cannot understand (the message names the node)."""


class NoAttentionFoundError(DiscoverError):
    """The graph has no attention block at all."""


class UnsupportedArchitectureError(DiscoverError):
    """The graph uses a variant that grainfx cannot prune exactly (the message names the node)."""


class MaskError(PassError, ValueError):
    """A mask has the wrong name, shape or values."""


class NotInstrumentedError(PassError):
    """A pass that needs an instrumented graph got one without masks."""


class SaveError(PassError):
    """A module could not be written to a file."""


class LoadError(PassError):
    """A saved module could not be read."""


class ModelFileNotFoundError(LoadError, FileNotFoundError):
    """The file to load does not exist."""


class CorruptModelFileError(LoadError):
    """The file to load exists but is not a readable grainfx .pt2 file."""


class TrainingGraphError(PassError):
    """A pass meant for inference got a graph captured in train mode (dropout live)."""


class StructureMismatchError(PassError):
    """A Structure was applied to a graph it was not discovered on."""


class UncoveredLayersWarning(UserWarning):
    """Linear layers inside the transformer layers that no prunable unit covers: they stay
    whole (``Structure.uncovered`` names them)."""


class UnsafeModelFileError(LoadError):
    """The file to load holds something that loading would execute (a pickle, code in the
    program's strings, a member grainfx does not write): refused before any of it is read."""


class ContractError(PassError):
    """In checked mode (:mod:`passes.contracts`), a pass broke what it requires or ensures;
    the message names the pass and the invariant."""
