"""The kept-structure record: what :func:`passes.rewrite` kept, per layer and per head.

``rewrite`` attaches a :class:`KeptStructure` to the compact module (``module.grainfx_kept``);
``save`` adds the specs of the module's inputs and writes it as JSON inside the archive and
beside it (``model.json``); ``load`` reads it back with :meth:`KeptStructure.from_json`, which
checks every field on construction, since the archive may come from anyone. The JSON carries
a ``version``; records without one (grainfx 0.2) read as version 1, which has the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

VERSION = 1
#: The dtypes a model input may have (names of torch dtypes).
DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool", "float32", "float16", "bfloat16")


def _count(name: str, value: object, lowest: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r:.60}")


def _optional_count(name: str, value: object, lowest: int = 0) -> None:
    if value is not None:
        _count(name, value, lowest)


def to_plain(value: Any) -> Any:
    """A record (or a list or mapping of them) as JSON-ready data; fields that hold None, and
    ``query_less_mean`` when false, are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
            and not (f.name == "query_less_mean" and not getattr(value, f.name))
        }
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class HeadKept:
    """One kept attention head: its index in the dense layer, its query and value units, and
    whether it runs without scores, as the mean of its values."""

    head: int
    query: int
    value: int
    query_less_mean: bool = False

    def __post_init__(self) -> None:
        for name in ("head", "query", "value"):
            _count(name, getattr(self, name))
        if not isinstance(self.query_less_mean, bool):
            raise ValueError(f"query_less_mean must be true or false, got {self.query_less_mean!r}")


@dataclass(frozen=True)
class LayerKept:
    """One layer: its kept heads and FFN neurons, the dense sizes, and the bucket granularity
    its attention calls use (None where no attention call is left). Fields of a part the
    layer does not have (attention, FFN, grouped key/value heads) are None."""

    layer: int
    heads: tuple[HeadKept, ...] = ()
    heads_dense: int | None = None
    head_dim: int | None = None
    kv_heads_dense: int | None = None
    ffn: int | None = None
    ffn_dense: int | None = None
    bucket: int | None = None

    def __post_init__(self) -> None:
        _count("layer", self.layer)
        if not all(isinstance(h, HeadKept) for h in self.heads):
            raise ValueError("heads must be HeadKept records")
        for name in ("heads_dense", "head_dim", "kv_heads_dense", "ffn", "ffn_dense"):
            _optional_count(name, getattr(self, name))
        _optional_count("bucket", self.bucket, lowest=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerKept:
        fields = dict(data)
        fields["heads"] = tuple(HeadKept(**h) for h in fields.get("heads", ()))
        return cls(**fields)


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of an example input, and the largest value of integer ones (so that
    benchmarks draw valid token ids)."""

    shape: tuple[int, ...]
    dtype: str
    max: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        for n in self.shape:
            _count("an input size", n)
        if math.prod(self.shape) > 2**24:
            raise ValueError(f"an example input of shape {self.shape} is larger than any")
        if self.dtype not in DTYPES:
            raise ValueError(f"an input dtype must be one of {DTYPES}, got {self.dtype!r:.40}")
        _optional_count("max", self.max)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def of(cls, t: torch.Tensor) -> InputSpec:
        top = int(t.max()) if not t.dtype.is_floating_point and t.numel() else None
        return cls(tuple(t.shape), str(t.dtype).replace("torch.", ""), top)


def input_specs(data: Mapping[str, Any]) -> dict[str, InputSpec]:
    """:class:`InputSpec` records of their JSON data, by input name."""
    return {name: InputSpec(**spec) for name, spec in data.items()}


@dataclass(frozen=True)
class KeptStructure:
    """What a compact module kept: its layers, parameter counts (all, and in prunable units,
    against the dense model's), density, the linear layers no unit covers, the bucket choice
    (``bucket``: the option given, ``"auto"`` or a granularity; ``bucket_shape``: the shape
    its cost model priced) and, once saved, the specs of its inputs."""

    layers: tuple[LayerKept, ...]
    hidden: int
    parameters: int
    unit_parameters: int
    unit_parameters_dense: int
    parameters_dense: int
    density: float
    uncovered: tuple[str, ...] = ()
    bucket: int | str = 4
    bucket_shape: tuple[int, int] = (8, 128)
    merge_projections: bool = True
    inputs: Mapping[str, InputSpec] = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "uncovered", tuple(self.uncovered))
        object.__setattr__(self, "bucket_shape", tuple(self.bucket_shape))
        if not all(isinstance(layer, LayerKept) for layer in self.layers):
            raise ValueError("layers must be LayerKept records")
        for name in ("hidden", "parameters", "unit_parameters", "parameters_dense"):
            _count(name, getattr(self, name))
        _count("unit_parameters_dense", self.unit_parameters_dense, lowest=1)
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ValueError(f"density must be a number, got {self.density!r:.60}")
        if not all(isinstance(name, str) for name in self.uncovered):
            raise ValueError("uncovered must be a list of layer names")
        if self.bucket != "auto":
            _count("bucket", self.bucket, lowest=1)
        if len(self.bucket_shape) != 2:
            raise ValueError(f"bucket_shape must be (batch, sequence), got {self.bucket_shape}")
        for n in self.bucket_shape:
            _count("a bucket_shape size", n, lowest=1)
        if not isinstance(self.merge_projections, bool):
            raise ValueError("merge_projections must be true or false")
        if not all(isinstance(s, InputSpec) for s in self.inputs.values()):
            raise ValueError("inputs must be InputSpec records")
        if self.version != VERSION:
            raise ValueError(f"version {self.version!r:.20} records are not known here")

    def with_inputs(self, inputs: Mapping[str, torch.Tensor]) -> KeptStructure:
        """This record with the specs of ``inputs`` (a module's example inputs)."""
        return dataclasses.replace(self, inputs={k: InputSpec.of(t) for k, t in inputs.items()})

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeptStructure:
        """The record of :meth:`to_dict` data; ValueError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a kept-structure record is a JSON object, not {type(data).__name__}")
        fields = dict(data)
        try:
            fields["layers"] = tuple(LayerKept.from_dict(x) for x in fields.get("layers", ()))
            fields["inputs"] = input_specs(fields.get("inputs", {}))
            return cls(**fields)
        except (TypeError, AttributeError) as exc:  # a missing, unknown or misshapen field
            raise ValueError(f"the kept-structure record does not fit: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> KeptStructure:
        return cls.from_dict(json.loads(text))
