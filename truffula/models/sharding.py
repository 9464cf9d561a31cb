"""Tensor parallelism as a transform of a model built on the meta device (before its weights are
allocated): ``shard_model`` swaps in the parallel layers of ``truffula.layers.parallel_linear``.

Per decoder layer: q/k/v column-parallel by KV head group (each rank holds ``heads / N`` query
heads and ``kv_heads / N`` KV heads, so its KV cache holds only those), o_proj row-parallel;
gate/up column-parallel, down_proj row-parallel. The attention block and the MLP end with one
all-reduce each, of the row-parallel partial sums (LoRA deltas included). The embedding and the
LM head are vocabulary-parallel: ``compute_logits`` returns this rank's slice of the vocabulary
(the runner merges the ranks' statistics, ``truffula.distributed.stats``).

Supported: the models built of the shared blocks of ``truffula.models.common`` (Llama, Mistral,
Qwen2, Qwen3, Phi-3 whose checkpoint stores q/k/v and gate/up fused, Gemma 2, whose
soft-capping is elementwise and so per slice, Mixtral, each expert sharded like a gated MLP
and the routed sum reduced once); ``check_shardable`` names what else is refused.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from truffula.layers.parallel_linear import (
    ColumnParallelLinear,
    ColumnParallelMergedLinear,
    Group,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from truffula.models.common import CausalLM, GatedMLP, SelfAttention, head_dim_of
from truffula.models.mixtral import SparseMoE

SHARDABLE = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "MixtralForCausalLM",
)
FLAG = "--tensor-parallel-size"


def check_shardable(architecture: str, config: Any, world: int) -> None:
    """Raise ValueError (naming the flag) unless the model splits evenly over ``world`` ranks."""
    if architecture not in SHARDABLE:
        raise ValueError(
            f"{FLAG} {world}: {architecture} cannot be sharded yet (supported: "
            f"{', '.join(SHARDABLE)}); serve it with {FLAG} 1"
        )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    sizes = {
        "attention heads (num_attention_heads)": heads,
        "KV heads (num_key_value_heads)": kv_heads,
        "intermediate_size": int(config.intermediate_size),
        "vocabulary (vocab_size)": int(config.vocab_size),
    }
    for what, n in sizes.items():
        if what.startswith("KV") and world % n == 0:
            continue  # fewer KV heads than ranks: each rank holds one, replicated
        if n % world:
            raise ValueError(
                f"{FLAG} {world}: the model's {n} {what} do not divide by {world}; choose a "
                f"size that divides it"
            )
    if head_dim_of(config) * heads == 0:
        raise ValueError(f"{FLAG} {world}: the model has no attention heads")


class ParallelSelfAttention(SelfAttention):
    """This rank's heads; the output projection's partial sums added over the ranks."""

    group: Group

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(positions, x))


class ParallelGatedMLP(GatedMLP):
    """This rank's slice of the intermediate; down_proj's partial sums added over the ranks."""

    group: Group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))


class ParallelSparseMoE(SparseMoE):
    """Every rank routes each token alike (its input and router are the same on every rank);
    each expert holds this rank's slice of its intermediate, and the weighted sum of the
    experts' partial outputs is added over the ranks once."""

    group: Group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))


def shard_model(model: CausalLM, group: Group) -> None:
    """Replace the layers of a (meta-device) model by this rank's parallel ones, in place."""
    world = group.world
    experts: set[int] = set()
    for module in list(model.modules()):
        if id(module) in experts:
            continue
        if type(module) is SelfAttention:
            _shard_attention(module, group)
        elif type(module) is GatedMLP:
            _shard_mlp(module, group)
            module.__class__ = ParallelGatedMLP
            cast(ParallelGatedMLP, module).group = group
        elif type(module) is SparseMoE:
            for expert in module.experts:
                _shard_mlp(cast(GatedMLP, expert), group)  # no reduce of its own
                experts.add(id(expert))
            module.__class__ = ParallelSparseMoE
            cast(ParallelSparseMoE, module).group = group
        elif isinstance(module, SelfAttention | GatedMLP | SparseMoE):
            raise ValueError(f"{FLAG} {world}: {type(module).__name__} cannot be sharded yet")
    cfg = model.config
    inner: Any = model.model
    inner.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group)
    model.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, False, group)
    model.tie_weights()


def _shard_attention(m: SelfAttention, group: Group) -> None:
    world = group.world
    hidden, d = m.qkv_proj.in_features, m.head_dim
    kv_heads = m.num_kv_heads
    if kv_heads >= world:
        kv_local, kv_first = kv_heads // world, group.rank * (kv_heads // world)
    else:  # each KV head serves world / kv_heads ranks: the one of this rank's query heads
        kv_local, kv_first = 1, group.rank // (world // kv_heads)
    kv_range = (kv_first * d, kv_local * d)
    sizes = {"q": m.q_size, "k": m.kv_size, "v": m.kv_size}
    ranges = {"q": group.shard(m.q_size), "k": kv_range, "v": kv_range}
    bias = m.qkv_proj.bias is not None
    m.qkv_proj = ColumnParallelMergedLinear(hidden, sizes, bias, group, ranges)
    m.o_proj = RowParallelLinear(m.q_size, hidden, m.o_proj.bias is not None, group)
    m.num_heads //= world
    m.num_kv_heads = m.attn.num_kv_heads = kv_local
    m.q_size //= world
    m.kv_size = kv_local * d
    m.attn.num_heads //= world
    m.__class__ = ParallelSelfAttention
    cast(ParallelSelfAttention, m).group = group


def _shard_mlp(m: GatedMLP, group: Group) -> None:
    hidden = m.gate_up_proj.in_features
    inter = m.down_proj.in_features
    bias = m.gate_up_proj.bias is not None
    m.gate_up_proj = ColumnParallelMergedLinear(hidden, {"gate": inter, "up": inter}, bias, group)
    m.down_proj = RowParallelLinear(inter, hidden, m.down_proj.bias is not None, group)
