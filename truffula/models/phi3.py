"""Phi-3: the Llama block whose checkpoint already stores the fused ``qkv_proj`` and
``gate_up_proj`` (loaded whole, shard None); LongRoPE scaling and partial rotary come from the
shared rotary module (``rope_parameters``), the sliding window from ``config.sliding_window``."""

from __future__ import annotations

from truffula.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
