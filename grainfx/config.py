"""GrainConfig: every setting of a compress run, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from passes.errors import PassError
from passes.rewrite import is_shape


class ConfigError(PassError, ValueError):
    """A GrainConfig field (or a compress argument) is out of range."""


GRANULARITIES = ("intra", "head")
KD_POSITIONS = ("labeled", "all")


#: EMA horizons per pruning window under ``ema_beta="auto"``.
AUTO_HORIZONS = 3


@dataclass(frozen=True)
class GrainConfig:
    """Settings of :func:`grainfx.compress`; defaults are the GRAIN paper's GLUE settings, but
    for the importance EMA (see ``ema_beta``).

    Length: ``epochs`` passes over the dataloader, or exactly ``steps`` optimizer steps when
    given (the dataloader is cycled). ``accumulate``: each optimizer step sums the gradients of
    this many batches of the dataloader (micro-batches), each loss divided by ``accumulate``,
    so that a step sees ``accumulate`` times the dataloader's batch (in a process group: on
    every rank); ``epochs`` then counts ``len(dataloader) / accumulate`` steps each.
    Optimizer: AdamW (``learning_rate``, ``weight_decay``,
    ``adam_eps``), ``warmup`` share of steps of linear warm-up then linear decay, gradient
    norm clipped to ``max_grad_norm``. Distillation: soft cross-entropy on logits at
    ``temperature``, plus (``hidden_loss``) MSE between student and teacher layer outputs on
    every ``hidden_every``-th layer, through trainable maps initialised to identity, scaled by
    ``hidden_loss_weight``. Pruning: EMA of |dL/dm| with ``ema_beta`` (``"auto"``, the
    default: a few horizons per pruning window, see :meth:`beta`; the paper's 0.998 averages
    over ~500 steps, longer than a short run's whole pruning window, so its ranking would stay
    the dense model's; measured against 0.998 on Rotten Tomatoes, Twitter NER and a Llama LM in
    issue 13, it was better or no different on each); density 1 until
    ``prune_start`` of training, cubic down to the target by ``prune_end``; masks updated every
    ``prune_every`` steps; structure regularization with ``structure_alpha``.

    Ablation switches: ``gradient_separation`` (importance from the logit loss only),
    ``structure_regularization``, ``hidden_loss``, ``random_scores`` and ``granularity``
    (``"intra"``: query / value units and FFN neurons; ``"head"``: whole heads and FFN
    neurons); ``query_heads`` (under GQA, single query heads inside a key/value group are
    units too; False: only whole groups lose query heads).

    ``kd_positions``: for per-token logits with per-token ``labels`` in the batches (token
    classification), ``"labeled"`` distils the positions whose label is not -100 (the first
    sub-token of each word), ``"all"`` every non-padding position.

    ``latency_aware``: rank query units by importance per unit of latency: a unit's cost is
    its own projection plus its share of its head's sequence x sequence work (priced on this
    machine at ``latency_shape`` = (batch, sequence), see :mod:`grainfx.latency`), so heads
    with few query units lose them first and the compact model has fewer, fuller heads.
    ``latency_shape`` is also the shape at which the final rewrite times how to group heads of
    unequal sizes into attention calls (``grainfx.buckets.rewrite``).

    ``embedding_rank``: factorize the word embedding by truncated SVD to this rank (a table of
    width r and a projection to the model width, both trained); None (default) keeps it.
    ``output_name``: the model output to distil when it is neither ``logits`` nor the only one.
    """

    epochs: float = 20.0
    steps: int | None = None
    accumulate: int = 1
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 8.0
    hidden_loss: bool = True
    hidden_every: int = 2
    hidden_loss_weight: float = 1.0
    ema_beta: float | str = "auto"
    prune_start: float = 0.2
    prune_end: float = 0.4
    prune_every: int = 1
    structure_regularization: bool = True
    structure_alpha: float = 0.3
    gradient_separation: bool = True
    random_scores: bool = False
    granularity: str = "intra"
    query_heads: bool = True
    kd_positions: str = "labeled"
    latency_aware: bool = False
    latency_shape: tuple[int, int] = (8, 128)
    embedding_rank: int | None = None
    output_name: str | None = None
    max_bad_steps: int = 20
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        _integer(self, "steps", low=1, optional=True)
        _integer(self, "accumulate", low=1)
        _real(self, "epochs", low=0, low_open=True)
        _real(self, "learning_rate", low=0, low_open=True)
        _real(self, "weight_decay", low=0)
        _real(self, "adam_eps", low=0, low_open=True)
        _real(self, "warmup", low=0, high=1, high_open=True)
        _real(self, "max_grad_norm", low=0, low_open=True)
        _real(self, "temperature", low=0, low_open=True)
        _integer(self, "hidden_every", low=1)
        _real(self, "hidden_loss_weight", low=0)
        if isinstance(self.ema_beta, str) and self.ema_beta != "auto":
            raise ConfigError(
                f"GrainConfig: ema_beta must be a number in [0, 1) or 'auto', got {self.ema_beta!r}"
            )
        if self.ema_beta != "auto":
            _real(self, "ema_beta", low=0, high=1, high_open=True)
        _real(self, "prune_start", low=0, high=1)
        _real(self, "prune_end", low=0, high=1)
        if self.prune_start > self.prune_end:
            raise ConfigError(
                f"GrainConfig: prune_start ({self.prune_start}) must not be after "
                f"prune_end ({self.prune_end})"
            )
        _integer(self, "prune_every", low=1)
        _real(self, "structure_alpha", low=0, low_open=True)
        _integer(self, "embedding_rank", low=1, optional=True)
        _integer(self, "max_bad_steps", low=1)
        _integer(self, "seed", low=0)
        _integer(self, "version", low=1)
        for name in (
            "hidden_loss",
            "structure_regularization",
            "gradient_separation",
            "random_scores",
            "query_heads",
            "latency_aware",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"GrainConfig: {name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"GrainConfig: granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.kd_positions not in KD_POSITIONS:
            raise ConfigError(
                f"GrainConfig: kd_positions must be one of {KD_POSITIONS}, got "
                f"{self.kd_positions!r}"
            )
        if not is_shape(self.latency_shape):
            raise ConfigError(
                f"GrainConfig: latency_shape must be (batch, sequence), two ints >= 1, got "
                f"{self.latency_shape!r}"
            )
        object.__setattr__(self, "latency_shape", tuple(self.latency_shape))  # JSON: a list
        if self.latency_aware and self.granularity != "intra":
            raise ConfigError(
                "GrainConfig: latency_aware prices query units, and granularity="
                f"{self.granularity!r} has none; use granularity='intra' or latency_aware=False"
            )
        if self.output_name is not None and not isinstance(self.output_name, str):
            raise ConfigError(
                f"GrainConfig: output_name must be a string or None, got {self.output_name!r}"
            )

    def beta(self, total_steps: int) -> float:
        """The EMA factor of a run of ``total_steps``: ``ema_beta``, or for ``"auto"`` the one
        whose horizon (1 / (1 - beta) steps) fits :data:`AUTO_HORIZONS` times into the pruning
        window, so that the ranking is re-estimated while pruning goes on."""
        if self.ema_beta != "auto":
            return float(self.ema_beta)
        window = (self.prune_end - self.prune_start) * total_steps
        return 1.0 - AUTO_HORIZONS / max(window, AUTO_HORIZONS + 1)

    def to_dict(self) -> dict:
        """The config as JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GrainConfig":
        """A config from :meth:`to_dict` data; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"GrainConfig has no field {unknown[0]!r}; fields: {sorted(known)}")
        return cls(**data)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "" if low is None else f"{'>' if low_open else '>='} {low}"
    right = "" if high is None else f"{'<' if high_open else '<='} {high}"
    return " and ".join(part for part in (left, right) if part)


def _check_range(
    name: str,
    value: float,
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
    kind: str,
) -> None:
    bad = (low is not None and (value < low or (low_open and value == low))) or (
        high is not None and (value > high or (high_open and value == high))
    )
    if bad:
        raise ConfigError(
            f"GrainConfig: {name} must be {kind} "
            f"{_range_text(low, high, low_open, high_open)}, got {value!r}"
        )


def _real(
    config: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"GrainConfig: {name} must be a finite number, got {value!r}")
    _check_range(name, value, low, high, low_open, high_open, "a number")


def _integer(config: object, name: str, *, low: int | None = None, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"GrainConfig: {name} must be an int{' or None' if optional else ''}, got {value!r}"
        )
    _check_range(name, value, low, None, False, False, "an int")
