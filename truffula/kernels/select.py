"""Pick each kernel's implementation once, at start-up, from the device."""

from __future__ import annotations

import torch

from truffula.layers.attention import AttentionFn


def attention_impl(device: torch.device) -> AttentionFn:
    from truffula.kernels.attention_torch import paged_attention

    return paged_attention
