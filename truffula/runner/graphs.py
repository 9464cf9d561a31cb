"""CUDA graphs of the model's forward for decode-only steps, at a ladder of batch sizes.

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch
gaps. Inputs live in static buffers that each step fills (padding rows point at the null KV block
0, which no sequence owns); attention reads lengths and block tables from device memory, so one
graph serves any mix of sequence lengths. Each size also has a graph with LoRA (per-token adapter
slots as data), captured at start-up too: a capture costs far more than a step, so none happens
while requests wait. Steps with prefill chunks, or more sequences than the largest graph, run
eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from truffula.device import host_tensor
from truffula.forward import AttentionMetadata, ForwardContext, LoRABatch, forward_context, segments
from truffula.runner.context import StepBuilder
from truffula.scheduler.output import ScheduledSeq

log = logging.getLogger("truffula.runner")


LT_BATCHES = range(32, 65)
"""Graph batch sizes captured with cuBLASLt's GEMMs: on an H200 (8B shape) they take 118 µs
per layer at 64 rows against 125 µs for the default choice, and win at 32 rows too; at 8, 16
and 128+ rows the default is as fast or faster (a graph keeps the kernels chosen at capture)."""


@contextmanager
def _blas_for(bs: int) -> Iterator[None]:
    before = torch.backends.cuda.preferred_blas_library()
    if bs in LT_BATCHES:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def ladder(max_batch: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then every 8 up to ``max_batch`` (the running-request
    cap by default: 35 sizes, 70 graphs with LoRA, for 256; about 11 s on an H200 with an 8B
    model). A step pads up to the next size."""
    sizes = [1, 2, 4, 8, *list(range(16, max_batch + 1, 8))]
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        steps: StepBuilder,
        max_batch: int,
        max_len: int,
        block_size: int,
    ):
        self.model = model
        self.steps = steps
        self.device = device = steps.device
        self.block_size = block_size
        self.max_len = max_len
        self.sizes = ladder(max_batch)
        n = self.sizes[-1]
        width = -(-max_len // block_size)
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.lora_slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.segs = torch.zeros(3 * n, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.stream = torch.cuda.Stream(device)
        """Warm-up and capture stream of every graph."""

    def capture_all(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            for with_lora in (False, True):
                self._capture(bs, with_lora)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured %d decode graphs (batch %d..%d, with and without LoRA) in %.1f s; "
            "memory reserved grew by %.2f GiB",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            time.perf_counter() - start,
            (torch.cuda.memory_reserved(self.device) - before) / (1 << 30),
        )

    @torch.inference_mode()
    def profile(self) -> int:
        """Run the largest batch eagerly as its captures will (without and with LoRA), so the
        caller can read the peak memory the graphs' pool will need; returns the bytes of the
        outputs every captured graph keeps, which add to it."""
        bs = self.sizes[-1]
        out_bytes = 0
        for with_lora in (False, True):
            with forward_context(self._context(bs, with_lora)):
                out = self.model(self.ids[:bs], self.pos[:bs])
            out_bytes = out.shape[-1] * out.element_size()
            del out
        round_up = 2 << 20  # the allocator's large-block granularity, an upper bound
        kept = sum(-(-s * out_bytes // round_up) * round_up for s in self.sizes)
        return 2 * kept

    def _context(self, bs: int, with_lora: bool) -> ForwardContext:
        """The context of a batch of ``bs`` decodes over the static buffers (inside a capture,
        any rotary lookup of the positions is captured too)."""
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bs],
            block_tables=self.tables[:bs],
            seq_lens=self.lens[:bs],
            query_start_loc=self.qsl[: bs + 1],
            num_decodes=bs,
            max_query_len=1,
            max_seq_len=self.max_len,
            block_size=self.block_size,
            seq_lens_cpu=[1] * bs,
            query_start_loc_cpu=list(range(bs + 1)),
        )
        lora = None
        if with_lora:
            lora = LoRABatch(
                self.lora_slots[:bs], [], bs, graph=True, seg_table=self.segs[: 3 * bs]
            )
        return self.steps.context(meta, self.pos[:bs], lora)

    @torch.inference_mode()
    def _capture(self, bs: int, with_lora: bool) -> None:
        with _blas_for(bs):
            self._capture_with(bs, with_lora)

    def _capture_with(self, bs: int, with_lora: bool) -> None:
        ctx = self._context(bs, with_lora)
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                with forward_context(ctx):
                    self.model(self.ids[:bs], self.pos[:bs])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # captured on the warm-up stream: the BLAS workspaces cached for it were allocated by the
        # warm-up, outside the graphs' memory pool (one allocated during a capture lands in the
        # pool, where later captures may reuse its memory); the context is made once the capture
        # has begun, so any rotary lookup of the positions is part of the graph
        with (
            torch.cuda.graph(graph, pool=self.pool, stream=stream),
            forward_context(self._context(bs, with_lora)),
        ):
            out = self.model(self.ids[:bs], self.pos[:bs])
        self.pool = graph.pool()
        self.graphs[(bs, with_lora)] = (graph, out)

    def fits(self, seqs: list[ScheduledSeq]) -> bool:
        return len(seqs) <= self.sizes[-1] and all(s.num_tokens == 1 for s in seqs)

    @torch.inference_mode()
    def run(
        self, seqs: list[ScheduledSeq], fill: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Hidden states [len(seqs), hidden] of a decode-only step; ``fill`` (rows, ids on the
        device) overwrites placeholder tokens."""
        n = len(seqs)
        bs = next(s for s in self.sizes if s >= n)
        with_lora = any(s.adapter_slot >= 0 for s in seqs)
        if (bs, with_lora) not in self.graphs:
            log.info(
                "capturing a decode graph for batch %d%s", bs, " with LoRA" if with_lora else ""
            )
            self._capture(bs, with_lora)
        graph, out = self.graphs[(bs, with_lora)]
        bsz = self.block_size
        pad = bs - n
        pos = [s.start_pos for s in seqs] + [0] * pad
        slots = [s.block_ids[s.start_pos // bsz] * bsz + s.start_pos % bsz for s in seqs] + [
            0
        ] * pad
        width = max(len(s.block_ids) for s in seqs)
        rows = [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs] + [[0] * width] * pad
        host = host_tensor(
            [
                [s.token_ids[0] for s in seqs] + [0] * pad,
                pos,
                slots,
                [s.start_pos + 1 for s in seqs] + [1] * pad,
                [s.adapter_slot for s in seqs] + [-1] * pad,
            ],
            torch.long,
            self.device,
        )
        self.ids[:bs].copy_(host[0])
        if fill is not None:
            self.ids.index_copy_(0, fill[0], fill[1])
        self.pos[:bs].copy_(host[1])
        self.slots[:bs].copy_(host[2])
        self.lens[:bs].copy_(host[3])
        self.lora_slots[:bs].copy_(host[4])
        if with_lora:
            table = segments([s.adapter_slot for s in seqs], size=bs)
            self.segs[: 3 * bs].copy_(host_tensor(table, torch.long, self.device))
        self.tables[:bs, :width].copy_(host_tensor(rows, torch.int32, self.device))
        graph.replay()
        return out[:n]
