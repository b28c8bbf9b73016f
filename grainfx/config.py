"""GrainConfig: every setting of a compress run, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from passes.errors import PassError


class ConfigError(PassError, ValueError):
    """A GrainConfig field (or a compress argument) is out of range."""


GRANULARITIES = ("intra", "head")


@dataclass(frozen=True)
class GrainConfig:
    """Settings of :func:`grainfx.compress`; defaults are the GRAIN paper's GLUE settings.

    Length: ``epochs`` passes over the dataloader, or exactly ``steps`` optimizer steps when
    given (the dataloader is cycled). Optimizer: AdamW (``learning_rate``, ``weight_decay``,
    ``adam_eps``), ``warmup`` share of steps of linear warm-up then linear decay, gradient
    norm clipped to ``max_grad_norm``. Distillation: soft cross-entropy on logits at
    ``temperature``, plus (``hidden_loss``) MSE between student and teacher layer outputs on
    every ``hidden_every``-th layer, through trainable maps initialised to identity, scaled by
    ``hidden_loss_weight``. Pruning: EMA of |dL/dm| with ``ema_beta``; density 1 until
    ``prune_start`` of training, cubic down to the target by ``prune_end``; masks updated every
    ``prune_every`` steps; structure regularization with ``structure_alpha``.

    Ablation switches: ``gradient_separation`` (importance from the logit loss only),
    ``structure_regularization``, ``hidden_loss``, ``random_scores`` and ``granularity``
    (``"intra"``: query / value units and FFN neurons; ``"head"``: whole heads and FFN
    neurons).

    ``embedding_rank``: factorize the word embedding by truncated SVD to this rank (a table of
    width r and a projection to the model width, both trained); None (default) keeps it.
    ``output_name``: the model output to distil when it is neither ``logits`` nor the only one.
    """

    epochs: float = 20.0
    steps: int | None = None
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 8.0
    hidden_loss: bool = True
    hidden_every: int = 2
    hidden_loss_weight: float = 1.0
    ema_beta: float = 0.998
    prune_start: float = 0.2
    prune_end: float = 0.4
    prune_every: int = 1
    structure_regularization: bool = True
    structure_alpha: float = 0.3
    gradient_separation: bool = True
    random_scores: bool = False
    granularity: str = "intra"
    embedding_rank: int | None = None
    output_name: str | None = None
    max_bad_steps: int = 20
    seed: int = 0
    version: int = 1

    def __post_init__(self):
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(f"GrainConfig: {message}")

        need(self.steps is None or (isinstance(self.steps, int) and self.steps >= 1),
             f"steps must be a positive int or None, got {self.steps!r}")
        need(math.isfinite(self.epochs) and self.epochs > 0,
             f"epochs must be > 0, got {self.epochs!r}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps!r}")
        need(0 <= self.warmup < 1, f"warmup is a share of steps in [0, 1), got {self.warmup!r}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        need(self.hidden_every >= 1, f"hidden_every must be >= 1, got {self.hidden_every!r}")
        need(self.hidden_loss_weight >= 0,
             f"hidden_loss_weight must be >= 0, got {self.hidden_loss_weight!r}")
        need(0 <= self.ema_beta < 1, f"ema_beta must be in [0, 1), got {self.ema_beta!r}")
        need(0 <= self.prune_start <= self.prune_end <= 1,
             f"need 0 <= prune_start <= prune_end <= 1, got {self.prune_start!r}, "
             f"{self.prune_end!r}")
        need(self.prune_every >= 1, f"prune_every must be >= 1, got {self.prune_every!r}")
        need(self.structure_alpha > 0,
             f"structure_alpha must be > 0, got {self.structure_alpha!r}")
        need(self.granularity in GRANULARITIES,
             f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        need(self.embedding_rank is None or (isinstance(self.embedding_rank, int)
                                             and self.embedding_rank >= 1),
             f"embedding_rank must be a positive int or None, got {self.embedding_rank!r}")
        need(self.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {self.max_bad_steps!r}")

    def to_dict(self) -> dict:
        """The config as JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GrainConfig":
        return cls(**data)
