"""Steps on the CPU through ``kernels.decode_cpu`` for the models it fits.

``FusedDecode.bind(model)`` checks, once after the weights are quantized or packed, that the
model is a stack of pre-norm ``DecoderLayer``s the native call computes with the eager
modules' roundings: self-attention without q/k norms, sliding window or softcap, rotary over
the whole head, a SiLU gated MLP, RMSNorms, and projections of a kind it runs (int4, int8,
oneDNN-packed or dense, biases allowed), in float32 or bfloat16 on the CPU. Llama, Mistral
without a window and Qwen2 fit; the others run eager. Every step of a model that fits takes
it: decodes, prompt chunks and speculative verify steps, with adapters applied as the CPU's
gathered LoRA does; the gain is in steps of few tokens, where dispatch outweighs arithmetic.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn

from truffula.forward import ForwardContext, LoRABatch
from truffula.kernels import decode_cpu, norm_torch
from truffula.kernels.attention_torch import decode_layout, prefill_mask, seq_slots
from truffula.kernels.lora_torch import bag_layout
from truffula.layers.linear import Linear, MergedLinear
from truffula.layers.lora import LoRALinear
from truffula.layers.norm import RMSNorm
from truffula.models.common import DecoderLayer, DecoderModel, GatedMLP, SelfAttention

log = logging.getLogger("truffula.models")

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class FusedDecode:
    """The tensors of ``decode_layers`` gathered once; called with a step's ids and context."""

    def __init__(self, decoder: DecoderModel, layers: list[DecoderLayer]) -> None:
        self.decoder = decoder
        attns = [cast(SelfAttention, layer.self_attn) for layer in layers]
        self.attn = [a.attn for a in attns]
        self.weights: list[torch.Tensor] = []
        self.kinds: list[int] = []
        self.groups: list[int] = []
        self.layers = layers
        self.lora: list[LoRALinear | None] | None = None
        """Each projection's LoRA wrapper, or None; found at the first step with adapters
        (``apply_lora`` may wrap the projections after this is bound)."""
        for layer in layers:
            for name in PROJECTIONS:
                parts = _linear(layer.get_submodule(name))
                assert parts is not None
                kind, w, aux, bias, group = parts
                self.weights += [w, aux, bias]
                self.kinds.append(kind)
                self.groups.append(group)
        norms = [n for layer in layers for n in _norms(layer)]
        self.norms = [cast(torch.Tensor, _scale(n)) for n in [*norms, decoder.norm]]
        first = attns[0]
        self.eps = float(decoder.norm.eps)
        self.scale = float(first.attn.scale)
        self.heads = (first.num_heads, first.num_kv_heads, first.head_dim)

    @classmethod
    def bind(cls, model: nn.Module, dtype: torch.dtype) -> FusedDecode | None:
        """The fused decode of ``model``, or None where it does not fit (see the module doc) or
        the native call cannot be built here."""
        decoder = getattr(model, "model", None)
        if dtype not in (torch.float32, torch.bfloat16) or not isinstance(decoder, DecoderModel):
            return None
        layers = [cast(DecoderLayer, layer) for layer in decoder.layers]
        if not layers or not all(_fits(layer) for layer in layers) or decoder.embed_scale:
            return None
        eps = {float(n.eps) for layer in layers for n in _norms(layer)}
        if eps != {float(decoder.norm.eps)} or _scale(decoder.norm) is None:
            return None
        if not decode_cpu.available():
            return None
        log.info("CPU steps: %d layers in one native call (fused CPU decode)", len(layers))
        return cls(decoder, layers)

    def __call__(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The final norm's output [T, hidden] of a step's T tokens, or None where the step cannot
        run here (no rotary tables, an adapted projection without gathered factor rows)."""
        meta = ctx.attn
        if ctx.cos is None or ctx.sin is None:
            return None
        if ctx.lora is not None and self.lora is None:
            self.lora = [
                _wrapper(layer.get_submodule(n)) for layer in self.layers for n in PROJECTIONS
            ]
        lora = lora_inputs(self.lora or [], ctx.lora)
        if lora is None:
            return None
        nd = meta.num_decodes
        if nd:
            slots, mask, span = decode_layout(meta, None)
        else:
            slots, mask, span = meta.slot_mapping.new_empty(0, 0), None, None
        starts, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        chunks = range(nd, meta.num_seqs)
        chunk_lens = [starts[s + 1] - starts[s] for s in chunks]
        x = cast(nn.Embedding, self.decoder.embed_tokens)(input_ids)
        h, hkv, d = self.heads
        return torch.ops.truffula_cpu.decode_layers(
            x,
            self.weights,
            self.kinds,
            self.groups,
            self.norms,
            [a.k_cache for a in self.attn],
            [a.v_cache for a in self.attn],
            ctx.cos,
            ctx.sin,
            slots,
            mask,
            -1 if span is None else span[0],
            [starts[s] for s in chunks],
            chunk_lens,
            [seq_slots(meta, s, lens[s]) for s in chunks],
            [
                prefill_mask(meta, s, q, lens[s], None)
                for s, q in zip(chunks, chunk_lens, strict=True)
            ],
            meta.slot_mapping,
            *lora,
            self.eps,
            self.scale,
            h,
            hkv,
            d,
        )


LoRAInputs = tuple[
    list[torch.Tensor],
    list[torch.Tensor],
    list[int],
    list[int],
    list[torch.Tensor],
    list[torch.Tensor],
    list[int],
    torch.Tensor | None,
]


NO_LORA: LoRAInputs = ([], [], [], [], [], [], [], None)


def lora_inputs(lora: list[LoRALinear | None], batch: LoRABatch | None) -> LoRAInputs | None:
    """``decode_layers``' LoRA arguments for a step: each projection's A rows (empty where the
    step adds nothing to it), its shards' B rows each list ended by an empty tensor, their
    offsets, the bag of its input width, and the step's bags (``lora_torch.bag_layout``; the
    rank's last). None: a projection the step adapts has no gathered factor rows."""
    if batch is None:
        return NO_LORA
    none = torch.empty(0)
    a_rows: list[torch.Tensor] = []
    b_rows: list[torch.Tensor] = []
    offsets: list[int] = []
    bag_of: list[int] = []
    widths: list[int] = []
    for layer in lora:
        if layer is None or not any(layer.loaded[s] for s in batch.slots):
            a_rows.append(none)
            bag_of.append(0)
            continue
        if layer.rows is None:
            return None
        a, bs = layer.rows
        a_rows.append(a)
        b_rows += [*bs, none]
        offsets += [*layer.offsets, 0]
        width = layer.in_features
        if width not in widths:
            widths.append(width)
        bag_of.append(widths.index(width))
    if not widths:
        return NO_LORA
    rank = next(layer.max_rank for layer in lora if layer is not None)
    bags = [bag_layout(batch, w) for w in [*widths, rank]]
    rows = bags[0][2]
    return (
        a_rows,
        b_rows,
        offsets,
        bag_of,
        [b[0] for b in bags],
        [b[1] for b in bags],
        [b[3] for b in bags],
        rows,
    )


def _wrapper(module: nn.Module) -> LoRALinear | None:
    return module if isinstance(module, LoRALinear) else None


def _linear(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """A projection's parts; None for one it does not run, a tensor-parallel shard among them."""
    base = module.base if isinstance(module, LoRALinear) else module
    return cast(Linear, base).cpu_parts() if type(base) in (Linear, MergedLinear) else None


def _norms(layer: DecoderLayer) -> tuple[RMSNorm, RMSNorm]:
    return layer.input_layernorm, layer.post_attention_layernorm


def _scale(norm: nn.Module) -> torch.Tensor | None:
    """The float32 scale of an RMSNorm on the torch kernel without offset, else None."""
    if not isinstance(norm, RMSNorm) or norm.offset or norm.kernel is not norm_torch.add_rms_norm:
        return None
    return norm.scale


def _fits(layer: DecoderLayer) -> bool:
    if type(layer) is not DecoderLayer:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not SelfAttention or type(mlp) is not GatedMLP or attn.q_norm is not None:
        return False
    core, rotary = attn.attn, attn.rotary
    if core.sliding_window is not None or core.softcap is not None or core.fused is not None:
        return False
    if rotary.kernel is not None or rotary.rot_dim != attn.head_dim or rotary._long is not None:
        return False
    if mlp.act != "silu" or mlp.gated_row is not None:
        return False
    if core.k_cache.dtype != torch.float32 or not core.k_cache.numel():
        return False  # a float32 cache, allocated (the runner binds after allocating it)
    return all(_scale(n) is not None for n in _norms(layer)) and all(
        _linear(layer.get_submodule(name)) is not None for name in PROJECTIONS
    )
