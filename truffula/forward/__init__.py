"""The per-step records every model-side package reads: the ground floor of the runner's work.

``ForwardContext`` (attention layout over the paged cache, LoRA slots, the step's rotary
cos/sin) and the attention function type. The runner fills them; kernels, layers and models
read them. This package imports no other part of truffula but ``truffula.device``.
"""

from truffula.forward.context import (
    AttentionFn,
    AttentionMetadata,
    ForwardContext,
    forward_context,
    get_forward_context,
)
from truffula.forward.lora import LoRABatch, segments

__all__ = [
    "AttentionFn",
    "AttentionMetadata",
    "ForwardContext",
    "LoRABatch",
    "forward_context",
    "get_forward_context",
    "segments",
]
