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


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def lora_overlapped(device: torch.device):  # type: ignore[no-untyped-def]
    """CUDA with Triton: a projection with LoRA as ``apply(base, x, a, bt, offsets, batch)``.
    The shrink (zeroing its buffer, then the kernel) runs on a side stream while the base
    projection's GEMM runs (it needs only ``x``; a decode-sized GEMM leaves most SMs idle), then
    the expand adds the deltas to the GEMM's output. The buffer is allocated on the current
    stream, so a graph capture keeps it in its pool. None elsewhere."""
    if not (device.type == "cuda" and triton_kernels.ENABLED):
        return None
    from truffula.kernels import triton_lora

    def apply(base, x, a, bt, offsets, batch):  # type: ignore[no-untyped-def]
        current = torch.cuda.current_stream(device)
        side = _SIDE_STREAMS.get(device)
        if side is None:
            side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        tmp = triton_lora.shrink_buffer(x, a, zeroed=False)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            tmp.zero_()
            triton_lora.shrink_into(tmp, x, a, batch.seg_table)
        y = base(x)
        current.wait_stream(side)
        return triton_lora.lora_expand(y, tmp, bt, offsets, batch.seg_table, batch.token_slots)

    return apply


def lora_impl(device: torch.device):  # type: ignore[no-untyped-def]
    """The batched LoRA computation without the Triton kernels: the torch strategies."""
    from truffula.kernels.lora_torch import lora_apply

    return lambda y, x, a, bts, offsets, used, batch, bt: lora_apply(
        y, x, a, bts, offsets, used, batch
    )
