"""Qwen3: the Llama block with a per-head RMSNorm on q and k, applied before rotary (as HF does:
``q_norm(q_proj(x).view(..., head_dim))``); ``attention_bias`` covers q/k/v/o."""

from __future__ import annotations

from truffula.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
