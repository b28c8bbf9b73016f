"""grainfx: GRAIN structured pruning of transformers as torch.fx graph transformations.

``grainfx.compress(model, dataloader, sparsity)`` prunes a fine-tuned model into a compact
GraphModule; ``grainfx.save`` / ``grainfx.load`` write and read compact models as ``.pt2``
files (loading needs torch only); ``grainfx.load(OUT_DIR)`` of a folder written by
``grainfx compress`` gives a :class:`Predictor` callable on raw text (torch and tokenizers).
Under torchrun, ``compress`` on every rank trains one student together
(:mod:`grainfx.distributed`). The graph passes themselves live in the ``passes`` package.
"""

from grainfx.checkpoint import CheckpointConfig, CheckpointError
from grainfx.compress import (
    BatchError,
    CompressionResult,
    EmptyDataLoaderError,
    TeacherMismatchError,
    check,
    compress,
)
from grainfx.config import ConfigError, GrainConfig
from grainfx.distributed import DistributedError
from grainfx.inspect import Inspection, inspect
from grainfx.predict import Prediction, Predictor, load
from grainfx.stages import Stages, stages
from grainfx.trainer import TrainingDivergedError
from passes.serialize import resave, save

__version__ = "0.2.0"

__all__ = [
    "compress",
    "check",
    "CompressionResult",
    "GrainConfig",
    "CheckpointConfig",
    "save",
    "load",
    "resave",
    "Predictor",
    "Prediction",
    "inspect",
    "Inspection",
    "stages",
    "Stages",
    "ConfigError",
    "BatchError",
    "CheckpointError",
    "DistributedError",
    "EmptyDataLoaderError",
    "TeacherMismatchError",
    "TrainingDivergedError",
    "__version__",
]
