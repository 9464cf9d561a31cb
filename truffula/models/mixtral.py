"""Mixtral: the Mistral block with a sparse mixture of gated-MLP experts in place of the MLP.

Routing as HF: router logits -> softmax (fp32) -> top-k (``num_experts_per_tok``) -> the k
weights renormalised to sum 1; each expert is ``w2(act(w1 x) * w3 x)``. Checkpoint names:
the classic ``block_sparse_moe.gate`` / ``block_sparse_moe.experts.N.w1|w2|w3`` (what
``save_pretrained`` writes and the hub holds) and transformers 5's in-memory layout
(``mlp.gate``, stacked ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj``
[E, H, I]), which is cut into the per-expert modules here. The MoE block is ``mlp`` here (as in
transformers 5); each expert is a ``GatedMLP`` (w1 and w3 fused into ``gate_up_proj``, w2 is
``down_proj``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from truffula.layers.linear import Linear
from truffula.layers.rotary import RotaryEmbedding
from truffula.models.common import (
    CausalLM,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
    SelfAttention,
    head_dim_of,
)
from truffula.models.llama import sliding_window_of


class SparseMoE(nn.Module):
    """Top-k routed experts; a plain loop over the experts that received tokens."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        n, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate = Linear(h, n, bias=False)
        self.experts = nn.ModuleList(GatedMLP(h, i, config.hidden_act) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        probs = self.gate(x).float().softmax(-1)  # [T, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](x.index_select(0, tokens)) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(x.dtype))
        return out


class MixtralForCausalLM(CausalLM):
    packed_modules: ClassVar[dict[str, tuple[str, str | None]]] = {
        **CausalLM.packed_modules,
        "w1": ("gate_up_proj", "gate"),
        "w3": ("gate_up_proj", "up"),
        "w2": ("down_proj", None),
    }

    def __init__(self, config: Any, max_len: int) -> None:
        super().__init__(config, max_len)
        rotary = RotaryEmbedding(config, head_dim_of(config), max_len)
        layers = [
            DecoderLayer(
                config,
                SelfAttention(config, rotary, sliding_window=sliding_window_of(config, i)),
                SparseMoE(config),
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.make_head()

    def checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        return super().checkpoint_name(name.replace(".block_sparse_moe.", ".mlp."))

    def split_checkpoint_tensor(
        self, name: str, tensor: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]] | None:
        """transformers 5 stacked experts -> the classic per-expert w1 / w3 / w2 tensors."""
        prefix, _, last = name.rpartition(".experts.")
        if last == "gate_up_proj":
            inter = tensor.shape[1] // 2
            return [
                (f"{prefix}.experts.{e}.{w}.weight", part)
                for e in range(tensor.shape[0])
                for w, part in (("w1", tensor[e, :inter]), ("w3", tensor[e, inter:]))
            ]
        if last == "down_proj":
            return [(f"{prefix}.experts.{e}.w2.weight", tensor[e]) for e in range(tensor.shape[0])]
        return None
