"""Llama 2/3 (incl. llama3 rope scaling), SmolLM, and the Llama-shaped Mistral / Qwen2 variants."""

from __future__ import annotations

from typing import Any

from truffula.layers.rotary import RotaryEmbedding
from truffula.models.common import (
    CausalLM,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
    SelfAttention,
    head_dim_of,
)


class LlamaForCausalLM(CausalLM):
    qkv_bias = False

    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__(config, max_len)
        rotary = RotaryEmbedding(config, head_dim_of(config), max_len)
        bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        layers = [
            DecoderLayer(
                config,
                SelfAttention(
                    config,
                    rotary,
                    qkv_bias=self.qkv_bias or bias,
                    o_bias=bias,
                    sliding_window=self.sliding_window(config, i),
                ),
                GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias),
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.make_head()

    def sliding_window(self, config: Any, layer: int) -> int | None:
        return None
