"""A step's model inputs and its ``ForwardContext``, built from the scheduled sequences.

One ``StepBuilder`` per runner: it flattens the sequences' tokens, positions and cache slots,
copies them to the device (through pinned memory, without waiting for it), and completes the
context with the LoRA slot of each token and, when the model's rotary kernel needs them, the
step's cos/sin (looked up once for all layers).
"""

from __future__ import annotations

import torch
from torch import nn

from truffula.device import host_tensor, to_device
from truffula.forward import AttentionMetadata, ForwardContext, LoRABatch
from truffula.kernels.select import Kernels
from truffula.layers.rotary import RotaryEmbedding
from truffula.scheduler.output import ScheduledSeq


def step_rotary(model: nn.Module) -> RotaryEmbedding | None:
    """The model's rotary embedding when its layers read the step's cos/sin from the context."""
    found = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    if len(found) > 1:
        raise ValueError("the forward context carries the cos/sin of one rotary embedding")
    return found[0] if found and found[0].uses_step_tables else None


class StepBuilder:
    def __init__(
        self, model: nn.Module, kernels: Kernels, block_size: int, dtype: torch.dtype
    ) -> None:
        self.device = kernels.device
        self.dtype = dtype
        self.block_size = block_size
        self.rotary = step_rotary(model)
        self.lora_segments = kernels.lora.segments

    def prepare(
        self, seqs: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """(input ids [T], positions [T], context) of the step's flattened tokens."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        seq_of_token: list[int] = []
        starts = [0]
        for i, s in enumerate(seqs):
            tokens += s.token_ids
            positions += range(s.start_pos, s.start_pos + s.num_tokens)
            seq_of_token += [i] * s.num_tokens
            starts.append(starts[-1] + s.num_tokens)
        width = max(len(s.block_ids) for s in seqs)
        table = torch.tensor(
            [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs], dtype=torch.int32
        )
        pos = torch.tensor(positions, dtype=torch.long)
        owner = torch.tensor(seq_of_token, dtype=torch.long)
        slots = table[owner, pos // bs].long() * bs + pos % bs
        seq_lens = [s.start_pos + s.num_tokens for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, dev),
            block_tables=to_device(table, dev),
            seq_lens=host_tensor(seq_lens, torch.int32, dev),
            query_start_loc=host_tensor(starts, torch.int32, dev),
            num_decodes=sum(1 for s in seqs if s.num_tokens == 1),
            max_query_len=max(s.num_tokens for s in seqs),
            max_seq_len=max(seq_lens),
            block_size=bs,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=starts,
            request_ids=[s.request_id for s in seqs],
        )
        input_ids, pos_dev = host_tensor(tokens, torch.long, dev), to_device(pos, dev)
        adapter_slots = [s.adapter_slot for s in seqs for _ in range(s.num_tokens)]
        lora = LoRABatch.build(adapter_slots, dev, self.lora_segments)
        return input_ids, pos_dev, self.context(meta, pos_dev, lora)

    def context(
        self, meta: AttentionMetadata, positions: torch.Tensor, lora: LoRABatch | None
    ) -> ForwardContext:
        """The context of a step laid out by ``meta``, at ``positions`` (device)."""
        if self.rotary is None:
            return ForwardContext(meta, lora)
        cos, sin = self.rotary.step_tables(positions, meta, self.dtype)
        return ForwardContext(meta, lora, cos, sin)
