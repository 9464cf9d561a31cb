"""CUDA graphs of the model's forward: decode-only steps at a ladder of batch sizes, and steps
with prefill chunks beside their decodes at a ladder of token counts.

A step launches hundreds of small kernels; replaying a captured graph removes the launch gaps
(an 8B model's eager step costs several decode steps of host time). Inputs live in static
buffers that each step fills (padding tokens point at the null KV block 0, which no sequence
owns); attention reads lengths, block tables and, for mixed steps, the query layout (a tile
map, ``kernels.attention_varlen_triton``) from device memory, so one graph serves any mix of
sequence lengths. Each size also has a graph with LoRA (per-token adapter slots as data),
captured at start-up too: a capture costs far more than a step, so none happens while
requests wait. Mixed graphs exist when the scheduler caps a step's prefill while requests
decode (``max_prefill_while_decoding``): they cover up to that cap plus the largest decode
batch. Other steps (a long prefill alone, more sequences than the largest graph) run eagerly.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from truffula.device import host_tensor
from truffula.forward import AttentionMetadata, ForwardContext, LoRABatch, forward_context, segments
from truffula.kernels.triton_support import varlen_block_q
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


def token_ladder(max_tokens: int) -> list[int]:
    """Token counts of the mixed graphs: 32, 64, then every 64 up to ``max_tokens`` (9 sizes
    for 512). A step pads up to the next size."""
    if max_tokens <= 0:
        return []
    sizes = [32, *list(range(64, max_tokens + 1, 64))]
    return sorted({s for s in sizes if s <= max_tokens} | {max_tokens})


def max_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Query tiles of ``block_q`` tokens that ``num_tokens`` tokens over at most ``num_seqs``
    sequences can need."""
    return -(-num_tokens // block_q) + min(num_seqs, num_tokens)


def tile_map(
    query_lens: list[int],
    block_q: int,
    size: int,
    kv_lens: list[int] | None = None,
    pieces: int = 0,
    min_keys: int = 256,
) -> list[list[int]]:
    """[sequence, first query token, piece, pieces] of each tile of ``block_q`` tokens, padded
    with (-1, 0, 0, 1) to ``size`` entries. With ``kv_lens`` (tokens in the cache after the
    step) and ``pieces`` (how many entries would keep the GPU busy), tiles over long key ranges
    are split into pieces of at least ``min_keys`` keys, the longest first, while the map has
    fewer than ``min(pieces, size)`` entries: each piece is an entry of its own, after the
    tile's earlier pieces."""
    tiles = [(s, q0) for s, n in enumerate(query_lens) for q0 in range(0, n, block_q)]
    split = [1] * len(tiles)
    room = min(pieces, size) - len(tiles)
    if kv_lens is not None and room > 0:
        keys = [  # keys up to each tile's last token
            min(kv_lens[s], kv_lens[s] - query_lens[s] + q0 + block_q) for s, q0 in tiles
        ]
        heap: list[tuple[float, int]] = [(-k, i) for i, k in enumerate(keys)]
        heapq.heapify(heap)
        while heap and room > 0:
            _, i = heapq.heappop(heap)
            if keys[i] < (split[i] + 1) * min_keys or split[i] >= MAX_PIECES:
                continue
            split[i] += 1
            room -= 1
            heapq.heappush(heap, (-keys[i] / split[i], i))
    rows: list[list[int]] = [[], [], [], []]
    for (s, q0), n in zip(tiles, split, strict=True):
        for piece in range(n):
            for row, v in zip(rows, (s, q0, piece, n), strict=True):
                row.append(v)
    pad = size - len(rows[0])
    for row, v in zip(rows, (-1, 0, 0, 1), strict=True):
        row += [v] * pad
    return rows


MAX_PIECES = 16
"""Pieces one tile's key range is split into at most."""


class StepGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        steps: StepBuilder,
        max_batch: int,
        max_len: int,
        block_size: int,
        mixed_tokens: int = 0,
        heads: tuple[int, int] = (1, 1),
    ):
        """Decode graphs for 1..``max_batch`` sequences; mixed graphs (prefill chunks beside
        decodes) for up to ``mixed_tokens`` tokens over up to ``max_batch`` sequences (0:
        none); ``heads``: the attention's (query, kv) heads, which set the tile size."""
        self.model = model
        self.steps = steps
        self.device = device = steps.device
        self.block_size = block_size
        self.max_len = max_len
        self.sizes = ladder(max_batch)
        self.mixed_sizes = token_ladder(mixed_tokens)
        self.block_q = varlen_block_q(*heads)
        n = self.sizes[-1]
        tokens = max(n, mixed_tokens)
        width = -(-max_len // block_size)
        self.ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.pos = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slots = torch.zeros(tokens, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.mixed_qsl = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.tiles = torch.tensor(
            tile_map([], self.block_q, max_tiles(tokens, n, self.block_q)),
            dtype=torch.int32,
            device=device,
        )
        self.pieces = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        self.pieces //= heads[1]
        """Map entries that fill the GPU four times over (a program per entry and kv head)."""
        self.lora_slots = torch.full((tokens,), -1, dtype=torch.long, device=device)
        self.segs = torch.zeros(3 * tokens, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """Decode graphs by (batch, with LoRA)."""
        self.mixed: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """Mixed graphs by (tokens, with LoRA)."""
        self.pool: torch.cuda._POOL_HANDLE | None = None
        self.stream = torch.cuda.Stream(device)
        """Warm-up and capture stream of every graph."""

    def capture_all(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        # largest first, so smaller graphs reuse the memory pool's blocks
        todo = [(bs, False) for bs in self.sizes] + [(t, True) for t in self.mixed_sizes]
        for size, mixed in sorted(todo, reverse=True):
            for with_lora in (False, True):
                self._capture(size, with_lora, mixed)
        torch.cuda.synchronize(self.device)
        mixed_part = (
            f" and {len(self.mixed)} mixed-step graphs ({self.mixed_sizes[0]}.."
            f"{self.mixed_sizes[-1]} tokens)"
            if self.mixed
            else ""
        )
        log.info(
            "captured %d decode graphs (batch %d..%d)%s, with and without LoRA, in %.1f s; "
            "memory reserved grew by %.2f GiB",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            mixed_part,
            time.perf_counter() - start,
            (torch.cuda.memory_reserved(self.device) - before) / (1 << 30),
        )

    @torch.inference_mode()
    def profile(self) -> int:
        """Run the largest decode batch and mixed step eagerly as their captures will (without
        and with LoRA), so the caller can read the peak memory the graphs' pool will need;
        returns the bytes of the outputs every captured graph keeps, which add to it."""
        out_bytes = 0
        largest = [(self.sizes[-1], False)]
        if self.mixed_sizes:
            largest.append((self.mixed_sizes[-1], True))
        for size, mixed in largest:
            for with_lora in (False, True):
                with forward_context(self._context(size, with_lora, mixed)):
                    out = self.model(self.ids[:size], self.pos[:size])
                out_bytes = out.shape[-1] * out.element_size()
                del out
        round_up = 2 << 20  # the allocator's large-block granularity, an upper bound
        kept = sum(-(-s * out_bytes // round_up) * round_up for s in self.sizes + self.mixed_sizes)
        return 2 * kept

    def _context(self, size: int, with_lora: bool, mixed: bool = False) -> ForwardContext:
        """The context of a step of ``size`` decodes, or of ``size`` tokens with prefill chunks
        (``mixed``), over the static buffers (inside a capture, any rotary lookup of the
        positions is captured too)."""
        n = self.sizes[-1]
        if mixed:
            meta = AttentionMetadata(
                slot_mapping=self.slots[:size],
                block_tables=self.tables,
                seq_lens=self.lens,
                query_start_loc=self.mixed_qsl,
                num_decodes=0,
                max_query_len=size,
                max_seq_len=self.max_len,
                block_size=self.block_size,
                tiles=self.tiles[:, : max_tiles(size, n, self.block_q)],
            )
        else:
            meta = AttentionMetadata(
                slot_mapping=self.slots[:size],
                block_tables=self.tables[:size],
                seq_lens=self.lens[:size],
                query_start_loc=self.qsl[: size + 1],
                num_decodes=size,
                max_query_len=1,
                max_seq_len=self.max_len,
                block_size=self.block_size,
                seq_lens_cpu=[1] * size,
                query_start_loc_cpu=list(range(size + 1)),
            )
        lora = None
        if with_lora:
            lora = LoRABatch(
                self.lora_slots[:size], [], size, graph=True, seg_table=self.segs[: 3 * size]
            )
        return self.steps.context(meta, self.pos[:size], lora)

    @torch.inference_mode()
    def _capture(self, size: int, with_lora: bool, mixed: bool) -> None:
        with _blas_for(0 if mixed else size):
            self._capture_with(size, with_lora, mixed)

    def _capture_with(self, size: int, with_lora: bool, mixed: bool) -> None:
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                with forward_context(self._context(size, with_lora, mixed)):
                    self.model(self.ids[:size], self.pos[:size])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # captured on the warm-up stream: the BLAS workspaces cached for it were allocated by the
        # warm-up, outside the graphs' memory pool (one allocated during a capture lands in the
        # pool, where later captures may reuse its memory); the context is made once the capture
        # has begun, so any rotary lookup of the positions is part of the graph
        with (
            torch.cuda.graph(graph, pool=self.pool, stream=stream),
            forward_context(self._context(size, with_lora, mixed)),
        ):
            out = self.model(self.ids[:size], self.pos[:size])
        self.pool = graph.pool()
        (self.mixed if mixed else self.graphs)[(size, with_lora)] = (graph, out)

    def fits(self, seqs: list[ScheduledSeq]) -> bool:
        if len(seqs) > self.sizes[-1]:
            return False
        if all(s.num_tokens == 1 for s in seqs):
            return True
        return bool(self.mixed_sizes) and sum(s.num_tokens for s in seqs) <= self.mixed_sizes[-1]

    @torch.inference_mode()
    def run(
        self, seqs: list[ScheduledSeq], fill: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Hidden states [tokens, hidden] of a step that ``fits``; ``fill`` (rows, ids on the
        device) overwrites placeholder tokens."""
        num_tokens = sum(s.num_tokens for s in seqs)
        mixed = num_tokens > len(seqs)
        sizes = self.mixed_sizes if mixed else self.sizes
        size = next(s for s in sizes if s >= num_tokens)
        with_lora = any(s.adapter_slot >= 0 for s in seqs)
        family = self.mixed if mixed else self.graphs
        self._fill(seqs, size, mixed, with_lora)
        if fill is not None:
            self.ids.index_copy_(0, fill[0], fill[1])
        if (size, with_lora) not in family:
            # after the fill: the capture's warm-up runs this very step (writing the keys and
            # values the replay writes again), never the stale inputs of an earlier one, whose
            # cache slots may hold other tokens by now
            log.info(
                "capturing a %s graph for %d%s",
                "mixed-step" if mixed else "decode",
                size,
                " with LoRA" if with_lora else "",
            )
            self._capture(size, with_lora, mixed)
        graph, out = family[(size, with_lora)]
        graph.replay()
        return out[:num_tokens]

    def _fill(self, seqs: list[ScheduledSeq], size: int, mixed: bool, with_lora: bool) -> None:
        """Copy the step's tokens, positions, slots, lengths, block tables, adapter slots and
        (mixed) query layout into the static buffers, padded to ``size`` tokens."""
        bsz = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        lora: list[int] = []
        for s in seqs:
            ids += s.token_ids
            span = range(s.start_pos, s.start_pos + s.num_tokens)
            pos += span
            slots += [s.block_ids[p // bsz] * bsz + p % bsz for p in span]
            lora += [s.adapter_slot] * s.num_tokens
        pad = size - len(ids)
        n = len(seqs)
        lens = [s.start_pos + s.num_tokens for s in seqs]
        host = host_tensor(
            [ids + [0] * pad, pos + [0] * pad, slots + [0] * pad, lora + [-1] * pad],
            torch.long,
            self.device,
        )
        self.ids[:size].copy_(host[0])
        self.pos[:size].copy_(host[1])
        self.slots[:size].copy_(host[2])
        self.lora_slots[:size].copy_(host[3])
        if mixed:
            full = self.sizes[-1]
            starts = [0]
            for s in seqs:
                starts.append(starts[-1] + s.num_tokens)
            layout = tile_map(
                [s.num_tokens for s in seqs],
                self.block_q,
                max_tiles(size, full, self.block_q),
                lens,
                self.pieces,
            )
            small = host_tensor(
                [
                    *lens,
                    *[1] * (full - n),
                    *starts,
                    *[starts[-1]] * (full - n),
                    *layout[0],
                    *layout[1],
                    *layout[2],
                    *layout[3],
                ],
                torch.int32,
                self.device,
            )
            self.lens.copy_(small[:full])
            self.mixed_qsl.copy_(small[full : 2 * full + 1])
            self.tiles[:, : len(layout[0])].copy_(small[2 * full + 1 :].view(4, -1))
        else:
            self.lens[:size].copy_(host_tensor(lens + [1] * pad, torch.int32, self.device))
        if with_lora:
            table = segments(lora + [-1] * pad, size=size)
            self.segs[: 3 * size].copy_(host_tensor(table, torch.long, self.device))
        width = max(len(s.block_ids) for s in seqs)
        rows = [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]
        if not mixed:  # padding decodes read block 0
            rows += [[0] * width] * pad
        self.tables[: len(rows), :width].copy_(host_tensor(rows, torch.int32, self.device))
