"""Graph passes of grainfx: capture, discover, instrument, rewrite, serialize.

Each pass is a function from one artifact to the next; none of them trains or reads data::

    gm = capture(model, example_inputs)          # plain GraphModule, dynamic batch and sequence
    structure = discover(gm)                     # attention / FFN blocks and prunable units
    masked = instrument(gm, structure)           # masks multiplied in, all ones
    set_masks(masked, {...})                     # binary masks from your pruning method
    compact = rewrite(masked, structure)         # sliced weights, standalone graph
    save(compact, "model.pt2"); load("model.pt2")
"""

from passes.capture import capture, capture_pair
from passes.discover import discover
from passes.errors import (
    CaptureError,
    CorruptModelFileError,
    DiscoverError,
    InvalidInputsError,
    LoadError,
    MaskError,
    ModelFileNotFoundError,
    NoAttentionFoundError,
    NotInstrumentedError,
    PassError,
    SaveError,
    TrainingGraphError,
    UncoveredLayersWarning,
    UnsafeModelFileError,
    UnsupportedArchitectureError,
)
from passes.expose import expose
from passes.factorize import factorize_embedding
from passes.instrument import get_masks, instrument, record_mask_grads, set_masks
from passes.record import KeptStructure
from passes.rewrite import DEFAULT_BUCKET, RewriteOptions, rewrite
from passes.serialize import load, resave, save
from passes.structure import AttentionBlock, FFNBlock, Structure, UnitGroup

__all__ = [
    "capture",
    "capture_pair",
    "expose",
    "factorize_embedding",
    "discover",
    "instrument",
    "set_masks",
    "get_masks",
    "record_mask_grads",
    "rewrite",
    "RewriteOptions",
    "DEFAULT_BUCKET",
    "KeptStructure",
    "save",
    "load",
    "resave",
    "Structure",
    "AttentionBlock",
    "FFNBlock",
    "UnitGroup",
    "PassError",
    "CaptureError",
    "InvalidInputsError",
    "DiscoverError",
    "NoAttentionFoundError",
    "UnsupportedArchitectureError",
    "MaskError",
    "NotInstrumentedError",
    "TrainingGraphError",
    "SaveError",
    "LoadError",
    "ModelFileNotFoundError",
    "CorruptModelFileError",
    "UnsafeModelFileError",
    "UncoveredLayersWarning",
]
