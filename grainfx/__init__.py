"""grainfx: GRAIN structured pruning of transformers as torch.fx graph transformations.

``grainfx.save`` / ``grainfx.load`` write and read compact models as ``.pt2`` files; loading
needs torch only. The graph passes themselves live in the ``passes`` package.
"""

from passes.serialize import load, save

__version__ = "0.1.0"

__all__ = ["save", "load", "__version__"]
