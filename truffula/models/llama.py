"""Llama 2/3 (incl. llama3 rope scaling), SmolLM, and the Llama-shaped variants that subclass it
(Mistral, Qwen2, Qwen3, Phi-3)."""

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


def sliding_window_of(config: Any, layer: int) -> int | None:
    """HF's rule: ``config.sliding_window`` on every layer, unless ``config.layer_types`` names
    the layers that slide ("sliding_attention"). A query at position p sees keys p - W < j <= p
    (transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is None:
        return int(window)
    return int(window) if types[layer] == "sliding_attention" else None


class LlamaForCausalLM(CausalLM):
    qkv_bias = False
    qk_norm = False

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
                    qk_norm=self.qk_norm,
                    sliding_window=self.sliding_window(config, i),
                ),
                GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias),
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.make_head()

    def sliding_window(self, config: Any, layer: int) -> int | None:
        return sliding_window_of(config, layer)
