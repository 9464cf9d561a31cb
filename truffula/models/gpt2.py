"""GPT-2: learned absolute positions, pre-LayerNorm blocks with biases, no rotary, a fused
``c_attn`` ([q | k | v] rows), a plain (not gated) ``gelu_new`` MLP and a tied LM head.

Module names are HF's (``transformer.h.N.attn.c_attn`` ...), so peft target names apply as they
are. HF stores these projections as ``Conv1D`` ([in, out]); ``Conv1DLinear`` transposes them on
load. Checkpoints saved from the bare ``GPT2Model`` (the original hub files) lack the
``transformer.`` prefix; it is added.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from truffula.kernels.activation_torch import activation
from truffula.layers.attention import Attention
from truffula.layers.linear import Conv1DLinear, Linear
from truffula.layers.norm import LayerNorm
from truffula.models.common import CausalLM


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer: int) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim = heads, hidden // heads
        self.c_attn = Conv1DLinear(hidden, 3 * hidden, bias=True)
        self.c_proj = Conv1DLinear(hidden, hidden, bias=True)
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        self.attn = Attention(heads, heads, self.head_dim, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        q, k, v = self.c_attn(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = Conv1DLinear(config.hidden_size, inner, bias=True)
        self.c_proj = Conv1DLinear(inner, config.hidden_size, bias=True)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer: int) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps)
        self.attn = GPT2Attention(config, layer)
        self.ln_2 = LayerNorm(config.hidden_size, eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual add fused into the norms, as ``DecoderLayer``."""
        if residual is None:
            residual = x
            x = self.ln_1(x)
        else:
            x, residual = self.ln_1(x, residual)
        x, residual = self.ln_2(self.attn(x), residual)
        return self.mlp(x), residual


class GPT2Model(nn.Module):
    """HF's ``transformer.*``: token and position embeddings, blocks, final LayerNorm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        residual = None
        for block in self.h:
            x, residual = block(x, residual)
        x, _ = self.ln_f(x, residual)
        return x


class GPT2LMHeadModel(CausalLM):
    ignored_weights = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__(config, max_len)
        self.transformer = GPT2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        if name.endswith(self.ignored_weights):  # old causal-mask buffers
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        return name, None
