"""Pick each kernel's implementation once, at start-up, from the device."""

from __future__ import annotations

import torch

from truffula.kernels import triton_kernels
from truffula.layers.attention import AttentionFn


def attention_impl(device: torch.device) -> AttentionFn:
    if device.type == "cuda" and triton_kernels.ENABLED:
        from truffula.kernels.attention_cuda import paged_attention as cuda_attention

        return cuda_attention
    from truffula.kernels.attention_torch import paged_attention

    return paged_attention


def lora_impl(device: torch.device):  # type: ignore[no-untyped-def]
    """The batched LoRA computation: Triton BGMV on CUDA, the torch strategies elsewhere."""
    if device.type == "cuda" and triton_kernels.ENABLED:

        def bgmv(y, x, a, bts, offsets, used, batch, bt):  # type: ignore[no-untyped-def]
            return triton_kernels.lora_bgmv(y, x, a, bt, offsets, batch.seg_table)

        return bgmv
    from truffula.kernels.lora_torch import lora_apply

    return lambda y, x, a, bts, offsets, used, batch, bt: lora_apply(
        y, x, a, bts, offsets, used, batch
    )
