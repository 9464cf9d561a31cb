"""Blocks shared by the decoder-only models: self-attention, gated MLP, pre-norm decoder layer
and the ``CausalLM`` base class (embedding, layer stack, final norm, LM head, weight names).

A model file picks options (biases, q/k norm, sliding window, norms) and wires these together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from truffula.kernels.activation_torch import Activation, gated
from truffula.kernels.select import GatedRowFn, Kernels
from truffula.layers.attention import Attention
from truffula.layers.linear import Linear, MergedLinear
from truffula.layers.norm import RMSNorm
from truffula.layers.rotary import RotaryEmbedding


def head_dim_of(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


class SelfAttention(nn.Module):
    """q/k/v projection (one matmul), optional q/k RMSNorm, rotary, paged attention, output."""

    def __init__(
        self,
        config: Any,
        rotary: RotaryEmbedding,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        sliding_window: int | None = None,
        softcap: float | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, o_bias)
        self.rotary = rotary
        if qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm: RMSNorm | None = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale if scale is not None else self.head_dim**-0.5,
            sliding_window,
            softcap,
            rotary=rotary,
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.q_norm is None:
            return self.o_proj(self.attn.forward_qkv(positions, qkv.view(t, h + 2 * hkv, d)))
        assert self.k_norm is not None
        v = qkv[:, self.q_size + self.kv_size :].view(t, hkv, d)
        q = self.q_norm(qkv[:, : self.q_size].reshape(t, h, d))
        k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].reshape(t, hkv, d))
        q, k = self.rotary(positions, q), self.rotary(positions, k)
        return self.o_proj(self.attn(q, k, v))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, {"gate": intermediate, "up": intermediate}, bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act = act
        self.act_and_mul: Activation = gated(act)
        """act(gate) * up on the fused [gate | up] output, as the bound kernels compute it."""
        self.gated_row: GatedRowFn | None = None
        """One row's gate/up projection and activation in one kernel, where there is one."""

    def use_kernels(self, kernels: Kernels) -> None:
        self.act_and_mul = kernels.gated_activation(self.act)
        self.gated_row = kernels.gated_row(self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated_row is not None and x.shape[0] == 1:
            y = self.gate_up_proj.gated_row(x, self.gated_row)
            if y is not None:
                return self.down_proj(y)
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); the residual add is fused in norms."""

    def __init__(self, config: Any, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class SandwichDecoderLayer(nn.Module):
    """Gemma 2 block, four norms: x + post_attn(attn(norm(x))), then + post_ff(mlp(pre_ff(.)));
    the residual add is fused into ``input_layernorm`` and ``pre_feedforward_layernorm``."""

    def __init__(self, config: Any, self_attn: nn.Module, mlp: nn.Module, offset: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, offset)
        self.post_attention_layernorm = RMSNorm(h, eps, offset)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, hidden] -> (this block's output, residual stream before it)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class DecoderModel(nn.Module):
    """Embedding, layers and final norm; HF's ``model.*`` prefix. ``embed_scale`` multiplies the
    embeddings (in the model dtype, as Gemma does); ``norm_offset=1`` gives a (1 + w) final norm."""

    def __init__(
        self,
        config: Any,
        layers: Sequence[nn.Module],
        embed_scale: float | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_offset)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Base of every native model: ``forward(input_ids, positions) -> hidden`` and
    ``compute_logits(hidden) -> fp32 logits``; subclasses build ``self.model`` and the head."""

    #: checkpoint projection name -> (module holding it, shard name or None for the whole matrix)
    packed_modules: ClassVar[dict[str, tuple[str, str | None]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    #: checkpoint tensors that are not parameters here (substrings)
    ignored_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)
    final_logit_softcap: float | None = None

    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__()
        self.config = config
        self.max_len = max_len
        self.model: nn.Module
        self.lm_head: Linear

    def make_head(self) -> None:
        cfg = self.config
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens  # type: ignore[return-value]

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after to_empty)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = cast(nn.Parameter, self.input_embeddings().weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """Map a checkpoint tensor name to (parameter name, shard) or None to skip it."""
        if any(pattern in name for pattern in self.ignored_weights):
            return None
        for ckpt, (module, shard) in self.packed_modules.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{module}."), shard
        return name, None

    def split_checkpoint_tensor(
        self, name: str, tensor: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]] | None:
        """Pieces (checkpoint name, tensor) to load instead of a tensor that ``checkpoint_name``
        maps to no parameter, e.g. stacked MoE experts; None (the default): it is unexpected."""
        return None

    def linear_modules(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]
