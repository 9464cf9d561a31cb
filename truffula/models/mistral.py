"""Mistral: the Llama block with sliding-window attention (``config.sliding_window`` on every
layer when set; see ``sliding_window_of`` for the exact window)."""

from __future__ import annotations

from truffula.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
