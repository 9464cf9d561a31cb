"""One implementation per operation, chosen once per engine from the device and the dtype.

``select_kernels(device, dtype)`` returns the torch kernels (the CPU path; CUDA with
``TRUFFULA_KERNELS=torch`` or without Triton) or the Triton kernels (CUDA). Layers bind what
they need at start-up (``truffula.layers.bind``): a factory below resolves what depends on the
layer (its activation, head size, rope type, weight dtype) once, so a forward pass calls each
kernel directly, with no device or dtype checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from truffula.forward import AttentionFn, AttentionMetadata, LoRABatch
from truffula.kernels import activation_torch, attention_torch, norm_torch, triton_support
from truffula.kernels.activation_torch import Activation
from truffula.kernels.lora_torch import BatchedLoRA, GatheredLoRA, LoRAWeights
from truffula.kernels.quant_int4 import Int4Weight
from truffula.kernels.stats_torch import TokenStats, TorchTokenStats


class RMSNormFn(Protocol):
    """(norm(x + residual), x + residual), or (norm(x), None): see ``norm_torch.add_rms_norm``."""

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        offset: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


RotaryFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(x [T, H, d], positions [T], cos table, sin table [max_len, rot_dim], rot_dim) -> rotated x."""

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(x, weight, bias) -> ``F.linear(x, weight, bias)``."""

GatedRowFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor | None
]
"""(x, weight [gate | up], bias, fp8 row scale or None) -> act(gate) * up for one row in one
kernel (``linear_triton.gated_row``), or None where that kernel does not read the weight."""


class RotaryAttentionFn(Protocol):
    """A decode-only step from the qkv projection: rotary, cache write and attention in one
    (``attention_triton.rotary_decode_attention``)."""

    def __call__(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rot_dim: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor: ...


class LoRABackend(Protocol):
    """Adds the LoRA deltas of a step's tokens to a wrapped projection's output."""

    gathered: bool
    """The projection also keeps its factors as rows (``lora_torch.lora_gather``)."""
    segments: bool
    """Steps carry the segment table (``LoRABatch.seg_table``)."""

    def __call__(self, layer: LoRAWeights, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor: ...


class Kernels:
    """The torch kernels: the CPU path, and CUDA without Triton."""

    name = "torch"
    graph_safe = False
    """Every kernel of a decode step reads lengths and tables from device memory, so the step
    can be captured in a CUDA graph."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        cpu = device.type == "cpu"
        self.rms_norm: RMSNormFn = norm_torch.add_rms_norm
        self.lora: LoRABackend = GatheredLoRA() if cpu else BatchedLoRA()
        self.stats: TokenStats = TorchTokenStats(device)
        self._attention: AttentionFn = (
            attention_torch.paged_attention
            if cpu
            else functools.partial(attention_torch.paged_attention, flash_prefill=True)
        )

    def gated_activation(self, act_name: str) -> Activation:
        """act(x[..., :d]) * x[..., d:] for a fused [gate | up] projection."""
        return activation_torch.gated(act_name)

    def gated_row(self, act_name: str) -> GatedRowFn | None:
        """A one-row [gate | up] projection with ``act_name``'s gated activation in its
        epilogue; None: the projection, then ``gated_activation``."""
        return None

    def rotary(self, rope_type: str) -> RotaryFn | None:
        """A kernel looking cos/sin up by position; None: torch, with the step's cos/sin from
        the forward context."""
        return None

    def linear(self, weight: torch.Tensor) -> LinearFn:
        """The linear for this (dense) weight."""
        return F.linear

    def fp8_linear(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> y for an fp8 weight ``q`` [out, in] with float32 row ``scale`` [out]."""
        from truffula.kernels import quant_fp8

        return functools.partial(
            quant_fp8.linear_dequant, q=q, scale=scale.to(self.dtype), bias=bias
        )

    def int4_linear(
        self, w: Int4Weight, bias: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> y for an int4 weight (``kernels.quant_int4``): torch's CPU int4 matmul where it
        runs, else dequantize-then-matmul."""
        from truffula.kernels import quant_int4

        if self.device.type == "cpu" and quant_int4.cpu_int4pack_available():
            layout = quant_int4.to_cpu_layout(w)
            return functools.partial(quant_int4.linear_cpu, w=layout, bias=bias)
        return functools.partial(quant_int4.linear_dequant, w=w, bias=bias)

    def attention(self, head_dim: int) -> AttentionFn:
        return self._attention

    def rotary_attention(self, head_dim: int, rope_type: str) -> RotaryAttentionFn | None:
        """The fused decode path (``RotaryAttentionFn``), or None."""
        return None

    def mixed_graph_safe(self, head_dim: int) -> bool:
        """Whether the attention of ``head_dim`` reads a step's layout from device memory alone
        (a tile map), so steps with prefill chunks can be captured in CUDA graphs too."""
        return False


class TritonKernels(Kernels):
    """CUDA with Triton; the torch kernels where a Triton kernel does not apply."""

    name = "triton"
    graph_safe = True

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        from truffula.kernels import lora_triton, norm_triton, stats_triton

        self.rms_norm = norm_triton.add_rms_norm
        self.lora = lora_triton.TritonLoRA(device)
        self.stats = stats_triton.TritonTokenStats()

    def gated_activation(self, act_name: str) -> Activation:
        from truffula.kernels import activation_triton

        return activation_triton.gated(act_name)

    def gated_row(self, act_name: str) -> GatedRowFn | None:
        from truffula.kernels import activation_triton, linear_triton

        glu = activation_triton.glu_mode(act_name)
        if not (glu and linear_triton.GATED_ROWS):
            return None
        return functools.partial(linear_triton.gated_row, glu=glu)

    def rotary(self, rope_type: str) -> RotaryFn | None:
        if rope_type == "longrope":  # long or short factors per sequence: see layers.rotary
            return None
        from truffula.kernels import rotary_triton

        return rotary_triton.rotary

    def linear(self, weight: torch.Tensor) -> LinearFn:
        from truffula.kernels import linear_triton

        return linear_triton.linear if linear_triton.weight_fits(weight) else F.linear

    def fp8_linear(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        if q.shape[0] % 16 or q.shape[1] % 16:  # what ``_scaled_mm`` takes
            return super().fp8_linear(q, scale, bias)
        from truffula.kernels import quant_fp8_triton

        row = scale.float()[None, :].contiguous()
        return functools.partial(
            quant_fp8_triton.linear, q=q, scale=scale.float(), scale_row=row, bias=bias
        )

    def int4_linear(
        self, w: Int4Weight, bias: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        from truffula.kernels import quant_int4_triton

        return functools.partial(quant_int4_triton.linear, w=w, bias=bias)

    def attention(self, head_dim: int) -> AttentionFn:
        if not _pow2(head_dim):  # the Triton kernel tiles the head dimension by powers of two
            return self._attention
        from truffula.kernels import attention_triton

        return attention_triton.paged_attention

    def rotary_attention(self, head_dim: int, rope_type: str) -> RotaryAttentionFn | None:
        if not _pow2(head_dim) or self.rotary(rope_type) is None:
            return None
        from truffula.kernels import attention_triton

        return attention_triton.rotary_decode_attention

    def mixed_graph_safe(self, head_dim: int) -> bool:
        return _pow2(head_dim)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.cache
def select_kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """The kernels of an engine on ``device`` computing in ``dtype`` (one object per pair)."""
    if device.type == "cuda" and triton_support.ENABLED:
        return TritonKernels(device, dtype)
    return Kernels(device, dtype)
