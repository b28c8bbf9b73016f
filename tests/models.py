"""Tiny random-init transformer architectures for the tests (nothing is downloaded).

Every architecture has hidden size 32, 4 heads of 8, 2 layers and an FFN of 64 (GPT-2 keeps
its own default of 4 x hidden = 128), in an "eager" and an "sdpa" attention variant. Ids look
like ``"bert-eager"``.
"""

from __future__ import annotations

import torch
import transformers as T

HIDDEN = 32
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
FFN = 64
VOCAB = 100
IMAGE = 16
INIT_STD = 0.3
PATCH = 8

IMPLS = ("eager", "sdpa")
FAMILIES = ("bert", "roberta", "distilbert", "electra", "gpt2", "vit")
ARCHITECTURES = [f"{family}-{impl}" for family in FAMILIES for impl in IMPLS]
TEXT = [a for a in ARCHITECTURES if not a.startswith("vit")]

#: FFN width of each family (GPT-2 has no separate intermediate size: it uses 4 x hidden).
FFN_WIDTH = {family: FFN for family in FAMILIES} | {"gpt2": 4 * HIDDEN}


#: Rotary, grouped-query and gated architectures, and variants of attention code (hidden 64,
#: 2 layers, 4 query heads; ModernBERT 3 layers for a local and a global one).
MODERN_HIDDEN = 64
MODERN_FAMILIES = (
    "llama",
    "llama_mha",
    "mistral",
    "qwen2",
    "qwen2_cls",
    "qwen3",
    "phi3",
    "modernbert",
    "gptj",
    "neox",
    "gemma2",
    "dinov2",
    "mpnet",
    "cohere",
    "granite",
    "t5",
    "flan_t5",
    "bart",
    "marian",
    "whisper",
    "clip_text",
    "clip_vision",
    "falcon",
    "falcon_gqa",
    "bloom",
    "deberta_v2",
    "deberta_v3",
)
#: Families that transformers runs with eager attention only.
EAGER_ONLY = ("gemma2", "mpnet", "bloom", "deberta_v2", "deberta_v3")
#: Families that read images.
IMAGE_FAMILIES = ("vit", "dinov2", "clip_vision")
#: Encoder-decoder families: they also read ``decoder_input_ids``.
SEQ2SEQ_FAMILIES = ("t5", "flan_t5", "bart", "marian", "whisper")
#: Whisper reads log-mel features of a fixed length: MELS bins x 2 * its source positions.
MELS, FRAMES = 8, 32
MODERN = [
    f"{family}-{impl}"
    for family in MODERN_FAMILIES
    for impl in IMPLS
    if impl == "eager" or family not in EAGER_ONLY
]
ALL_ARCHITECTURES = ARCHITECTURES + MODERN
#: The token id that fills padded positions.
PAD_ID = {family: 0 for family in FAMILIES + MODERN_FAMILIES} | {"roberta": 1}


def split(arch_id: str) -> tuple[str, str]:
    family, impl = arch_id.split("-")
    if arch_id not in ALL_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch_id!r}; one of {ALL_ARCHITECTURES}")
    return family, impl


def _modern_config_and_class(family: str):
    """Tiny configs of the rotary / GQA / gated families (random init, nothing downloaded)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=MODERN_HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=96,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family in ("llama", "llama_mha"):
        kv = 2 if family == "llama" else HEADS
        return T.LlamaConfig(num_key_value_heads=kv, **common), T.LlamaForCausalLM
    if family == "mistral":
        return T.MistralConfig(
            num_key_value_heads=2, sliding_window=4, **common
        ), T.MistralForCausalLM
    if family in ("qwen2", "qwen2_cls"):
        cls = T.Qwen2ForCausalLM if family == "qwen2" else T.Qwen2ForSequenceClassification
        return T.Qwen2Config(num_key_value_heads=2, **common), cls
    if family == "qwen3":
        return T.Qwen3Config(num_key_value_heads=2, head_dim=24, **common), T.Qwen3ForCausalLM
    if family == "phi3":
        return T.Phi3Config(num_key_value_heads=2, **common), T.Phi3ForCausalLM
    if family == "modernbert":
        common.update(
            num_hidden_layers=3,
            global_attn_every_n_layers=2,
            local_attention=4,
            cls_token_id=1,
            sep_token_id=2,
        )
        return T.ModernBertConfig(**common), T.ModernBertForSequenceClassification
    if family == "gptj":
        return T.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=MODERN_HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            rotary_dim=8,
            n_positions=64,
            n_inner=96,
            bos_token_id=1,
            eos_token_id=2,
        ), T.GPTJForCausalLM
    if family == "neox":
        return T.GPTNeoXConfig(rotary_pct=0.5, **common), T.GPTNeoXForCausalLM
    if family == "dinov2":  # layer scale after attention and FFN
        return T.Dinov2Config(
            hidden_size=MODERN_HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            mlp_ratio=2,
            image_size=IMAGE,
            patch_size=PATCH,
            layerscale_value=0.5,
        ), T.Dinov2ForImageClassification
    if family == "mpnet":  # relative position bias added in place to the scores
        return T.MPNetConfig(**common), T.MPNetForSequenceClassification
    if family in ("t5", "flan_t5"):  # unscaled scores, position bias shared across layers
        return T.T5Config(
            vocab_size=VOCAB,
            d_model=MODERN_HIDDEN,
            d_kv=16,
            d_ff=96,
            num_layers=LAYERS,
            num_heads=HEADS,
            decoder_start_token_id=0,
            pad_token_id=0,
            feed_forward_proj="gated-gelu" if family == "flan_t5" else "relu",
        ), T.T5ForConditionalGeneration
    seq2seq = dict(
        vocab_size=VOCAB,
        d_model=MODERN_HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        pad_token_id=0,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "bart":
        return T.BartConfig(max_position_embeddings=64, **seq2seq), T.BartForConditionalGeneration
    if family == "marian":
        return T.MarianConfig(max_position_embeddings=64, **seq2seq), T.MarianMTModel
    if family == "whisper":
        return T.WhisperConfig(
            num_mel_bins=MELS,
            max_source_positions=FRAMES // 2,
            max_target_positions=64,
            suppress_tokens=None,
            begin_suppress_tokens=None,
            **seq2seq,
        ), T.WhisperForConditionalGeneration
    clip = dict(
        hidden_size=MODERN_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
    )
    if family == "clip_text":
        return T.CLIPTextConfig(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **clip,
        ), T.CLIPTextModel
    if family == "clip_vision":
        return T.CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, **clip), T.CLIPVisionModel
    if family == "falcon":  # x @ W.T projections, multi-query split by indexing, parallel
        return T.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=MODERN_HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            multi_query=True,
            new_decoder_architecture=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ), T.FalconForCausalLM
    if family == "falcon_gqa":  # kv heads repeated by broadcast_to; x @ W.T + b projections
        return T.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=MODERN_HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ), T.FalconForCausalLM
    if family == "bloom":  # ALiBi added by baddbmm in a (batch * heads) layout, fused QKV
        return T.BloomConfig(
            vocab_size=VOCAB,
            hidden_size=MODERN_HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ), T.BloomForCausalLM
    if family in ("deberta_v2", "deberta_v3"):
        # disentangled attention in a (batch * heads) layout: content-to-position and
        # position-to-content terms on relative embeddings shared across layers; v3 reuses
        # W_Q and W_K on them (share_att_key), v2 here has position projections of its own
        shared = family == "deberta_v3"
        config = T.DebertaV2Config(
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
            position_buckets=8,
            norm_rel_ebd="layer_norm",
            share_att_key=shared,
            **common,
        )
        cls = T.DebertaV2ForSequenceClassification if shared else T.DebertaV2Model
        return config, cls
    if family == "cohere":  # parallel block added as (stream + attention) + FFN
        return T.CohereConfig(num_key_value_heads=2, **common), T.CohereForCausalLM
    if family == "granite":  # residual multiplier between block output and residual add
        return T.GraniteConfig(
            num_key_value_heads=2, residual_multiplier=0.5, attention_multiplier=0.2, **common
        ), T.GraniteForCausalLM
    if family == "gemma2":
        # soft-capped scores, GeGLU, post-norms, head size 24 != hidden / heads, local layer
        return T.Gemma2Config(
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            **common,
        ), T.Gemma2ForCausalLM
    raise AssertionError(family)


def _config_and_class(family: str):
    if family == "bert":
        return T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
        ), T.BertForSequenceClassification
    if family == "roberta":
        return T.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ), T.RobertaForSequenceClassification
    if family == "distilbert":
        return T.DistilBertConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=FFN,
            max_position_embeddings=64,
        ), T.DistilBertForSequenceClassification
    if family == "electra":
        return T.ElectraConfig(
            vocab_size=VOCAB,
            embedding_size=HIDDEN,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
        ), T.ElectraForSequenceClassification
    if family == "gpt2":
        return T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
        ), T.GPT2LMHeadModel
    if family == "vit":
        return T.ViTConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            image_size=IMAGE,
            patch_size=PATCH,
        ), T.ViTForImageClassification
    raise AssertionError(family)


def build(arch_id: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model of ``arch_id`` in eval mode (random weights from ``seed``)."""
    family, impl = split(arch_id)
    config, cls = (
        _modern_config_and_class(family) if family in MODERN_FAMILIES else _config_and_class(family)
    )
    config._attn_implementation = impl
    # Weights larger than the usual 0.02 make attention scores O(1): with near-uniform
    # attention a wrong scale or a misplaced head would go unnoticed by the exactness tests.
    config.initializer_range = INIT_STD
    torch.manual_seed(seed)
    return cls(config).eval()


def example_inputs(
    arch_id: str, batch: int = 2, seq: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Keyword inputs of one forward call.

    Text models get ``input_ids`` and ``attention_mask``; rows after the first end in up to two
    padded positions (mask 0, pad token); encoder-decoders also get ``decoder_input_ids`` of
    ``seq // 2 + 1``. Image models get ``pixel_values`` and Whisper ``input_features`` (of
    fixed length) with its decoder inputs.
    """
    family, _ = split(arch_id)
    gen = torch.Generator().manual_seed(seed)
    if family == "whisper":
        return {
            "input_features": torch.randn(batch, MELS, FRAMES, generator=gen),
            "decoder_input_ids": torch.randint(3, VOCAB - 1, (batch, seq // 2 + 1), generator=gen),
        }
    if family in IMAGE_FAMILIES:
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}
    pad = PAD_ID[family]
    ids = torch.randint(3, VOCAB - 1, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        padded = min(row % 3, seq - 1)
        if padded:
            mask[row, seq - padded :] = 0
            ids[row, seq - padded :] = pad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in SEQ2SEQ_FAMILIES:
        inputs["decoder_input_ids"] = torch.randint(
            3, VOCAB - 1, (batch, seq // 2 + 1), generator=gen
        )
    return inputs


def build_bert(
    *,
    hidden: int = HIDDEN,
    heads: int = HEADS,
    layers: int = LAYERS,
    ffn: int = FFN,
    num_labels: int = 2,
    impl: str = "sdpa",
    seed: int = 0,
    init_std: float = INIT_STD,
    dropout: float = 0.1,
    vocab: int = VOCAB,
) -> torch.nn.Module:
    """A tiny BertForSequenceClassification with a custom shape, in eval mode.

    The defaults give the same model as ``build("bert-" + impl, seed)``; tests that need more
    heads, another label count or a trainable init change the arguments.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; one of {IMPLS}")
    config = T.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = impl
    config.initializer_range = init_std
    torch.manual_seed(seed)
    return T.BertForSequenceClassification(config).eval()
