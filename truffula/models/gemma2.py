"""Gemma 2: embeddings scaled by sqrt(hidden) (in the model dtype), RMSNorms with (1 + w), four
norms per layer, attention scale ``query_pre_attn_scalar ** -0.5``, attention and final logit
soft-capping, sliding window on the layers ``config.layer_types`` marks, gelu-tanh gated MLP,
tied embeddings."""

from __future__ import annotations

from typing import Any

from truffula.layers.rotary import RotaryEmbedding
from truffula.models.common import (
    CausalLM,
    DecoderModel,
    GatedMLP,
    SandwichDecoderLayer,
    SelfAttention,
    head_dim_of,
)
from truffula.models.llama import sliding_window_of


class Gemma2ForCausalLM(CausalLM):
    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__(config, max_len)
        rotary = RotaryEmbedding(config, head_dim_of(config), max_len)
        bias = bool(getattr(config, "attention_bias", False))
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        layers = [
            SandwichDecoderLayer(
                config,
                SelfAttention(
                    config,
                    rotary,
                    qkv_bias=bias,
                    o_bias=bias,
                    sliding_window=sliding_window_of(config, i),
                    softcap=getattr(config, "attn_logit_softcapping", None),
                    scale=float(config.query_pre_attn_scalar) ** -0.5,
                ),
                GatedMLP(config.hidden_size, config.intermediate_size, act),
                offset=1.0,
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(
            config, layers, embed_scale=config.hidden_size**0.5, norm_offset=1.0
        )
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)
        self.make_head()
