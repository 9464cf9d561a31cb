"""Drive a native model through the runner's input preparation, without sampling."""

from __future__ import annotations

from pathlib import Path

import torch

from truffula.config import EngineConfig
from truffula.forward import forward_context
from truffula.models.registry import load_model
from truffula.runner.runner import ModelRunner
from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.output import ScheduledSeq


class Harness:
    """Feeds token chunks of several sequences through the paged cache; returns logits rows."""

    def __init__(
        self,
        folder: Path,
        block_size: int = 4,
        num_blocks: int = 64,
        pack: bool = False,
        dtype: torch.dtype = torch.float32,
        quantization: str | None = None,
    ):
        # the longest sequence the cache holds (a cache shorter than the model's context is an
        # error unless the maximum length is capped too)
        loaded = load_model(folder, dtype, torch.device("cpu"), num_blocks * block_size)
        cfg = EngineConfig.from_kwargs(
            block_size=block_size,
            num_blocks=num_blocks,
            linear_kernel="packed" if pack else "torch",
            quantization=quantization,
        )
        self.runner = ModelRunner(loaded, cfg, torch.device("cpu"), dtype)
        self.pool = BlockPool(self.runner.num_blocks)
        self.block_size = block_size
        self.blocks: dict[str, list[int]] = {}
        self.pos: dict[str, int] = {}

    @torch.inference_mode()
    def step(
        self, chunks: dict[str, list[int]], slots: dict[str, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute ``chunks[seq]`` for each sequence (with LoRA slot ``slots[seq]`` if given);
        return each chunk's log-softmax rows."""
        slots = slots or {}
        seqs = []
        for rid, toks in chunks.items():
            start = self.pos.get(rid, 0)
            blocks = self.blocks.setdefault(rid, [])
            need = -(-(start + len(toks)) // self.block_size) - len(blocks)
            if need > 0:
                blocks += self.pool.allocate(need)
            seqs.append(ScheduledSeq(rid, toks, start, list(blocks), True, slots.get(rid, -1)))
            self.pos[rid] = start + len(toks)
        seqs.sort(key=lambda s: s.num_tokens != 1)
        ids, positions, ctx = self.runner.prepare(seqs)
        with forward_context(ctx):
            hidden = self.runner.model(ids, positions)
        logits = self.runner.model.compute_logits(hidden).log_softmax(-1)
        starts = ctx.attn.query_start_loc_cpu
        return {s.request_id: logits[starts[i] : starts[i + 1]] for i, s in enumerate(seqs)}
