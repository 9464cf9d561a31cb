"""GPT-NeoX / Pythia: LayerNorms with biases, partial rotary (``partial_rotary_factor``, the old
``rotary_pct``), biased projections, a plain MLP and parallel residual (``use_parallel_residual``:
x + attn(ln1(x)) + mlp(ln2(x)); else the sequential x + attn, then + mlp(ln2(.))).

The fused ``query_key_value`` keeps the checkpoint's row layout, interleaved per head
([heads, 3, head_dim]: q, k, v of head 0, then of head 1, ...), and is split at run time, so a
peft LoRA delta on ``query_key_value`` adds to it row for row. HF's ``embed_out`` head is loaded
as ``lm_head`` (transformers 5's name for it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from truffula.kernels.activation_torch import activation
from truffula.layers.attention import Attention
from truffula.layers.linear import Linear
from truffula.layers.norm import LayerNorm
from truffula.layers.rotary import RotaryEmbedding
from truffula.models.common import CausalLM


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Any, rotary: RotaryEmbedding) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", True))
        self.num_heads, self.head_dim = heads, hidden // heads
        self.query_key_value = Linear(hidden, 3 * hidden, bias)
        self.dense = Linear(hidden, hidden, bias)
        self.rotary = rotary
        self.attn = Attention(heads, heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; rows of query_key_value are [heads, 3, head_dim]."""
        t, h, d = x.shape[0], self.num_heads, self.head_dim
        qkv = self.query_key_value(x).view(t, h, 3, d)
        qk = self.rotary(positions, qkv[:, :, :2].transpose(1, 2).reshape(t, 2 * h, d))
        return self.dense(self.attn(qk[:, :h], qk[:, h:], qkv[:, :, 2]))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.parallel = bool(getattr(config, "use_parallel_residual", True))
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, rotary)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (the residual stream) -> [T, hidden]."""
        attn = self.attention(positions, self.input_layernorm(x))
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(nn.Module):
    """HF's ``gpt_neox.*``: embedding, layers, final LayerNorm."""

    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, max_len)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(config, rotary) for _ in range(config.num_hidden_layers)
        )
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_in(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(CausalLM):
    ignored_weights = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")

    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__(config, max_len)
        self.gpt_neox = GPTNeoXModel(config, max_len)
        self.make_head()

    def input_embeddings(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions)

    def checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        if name.endswith(self.ignored_weights):  # old mask / rotary buffers
            return None
        if name.startswith("embed_out."):
            return "lm_head." + name.removeprefix("embed_out."), None
        if not name.startswith(("gpt_neox.", "lm_head.")):
            name = "gpt_neox." + name
        return name, None
