"""The attention features discover looks for, in the order their hooks run.

Operand recognizers are tried on every query/key/value operand between its projection and
the attention op; block features are found, in this order, from what was traced of a block
(:class:`passes.features.Traced`). Order matters where hooks chain: key/value heads first
(their note opens a block's line), the head norm before the rotation (the model norms, then
rotates), relative-position terms before the score chain (they make it replayed), and the
score chain last.
"""

from __future__ import annotations

from passes.features import (
    AttentionFeature,
    OperandRecognizer,
    head_norm,
    kv_repeat,
    relative,
    rope,
    scores,
)

#: Recognizers of the ops between a projection and an attention operand.
OPERAND_RECOGNIZERS: tuple[OperandRecognizer, ...] = (
    kv_repeat.OPERAND,
    rope.OPERAND,
    head_norm.OPERAND,
)

#: Block features, in hook order.
FEATURES: tuple[type[AttentionFeature], ...] = (
    kv_repeat.KVRepeat,
    head_norm.HeadNorms,
    rope.Rotary,
    relative.RelativeTerms,
    scores.SdpaMask,
    scores.ScoreBiases,
    scores.ScoreReplay,
)
