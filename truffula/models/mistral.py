"""Mistral: the Llama block (full attention; sliding windows arrive with the window kernels)."""

from __future__ import annotations

from truffula.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
