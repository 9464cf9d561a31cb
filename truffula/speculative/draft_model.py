"""Draft-model drafts: a smaller model with the target's vocabulary proposes each speculating
request's next tokens greedily.

The draft model is loaded with the target's loader (``models.registry.load_model``) on the
target's device and dtype, serves the base model only (it knows nothing of adapters: an
adapter request is drafted from the base and verified by the target with its adapter), and
keeps its own paged KV cache (``draft_cache.DraftCache``) with one ``DraftSeq`` per request.

Before each step, for every request that speculates: the tokens its cache holds are compared
with the request's tokens from the last point known to agree; the cache is rolled back to the
first difference (rejected drafts), the tokens it has not seen are fed (the prompt at first,
then the accepted drafts and the target's own token after them), and the argmax of the last
position is the first draft; each further draft is one more single-token step. All of this is
batched over the speculating requests: one catch-up forward (more for long prompts, in chunks
of ``CATCH_UP_TOKENS``) and N - 1 single-token forwards for N drafted tokens. The last draft
is never fed: its keys and values are computed next time, if the target accepts it.

On CUDA, where the target replays CUDA graphs, the draft model's steps do too (graphs the
target's runner builds for it, ``graphs_for``): its single-token steps and catch-ups of up to
``GRAPH_TOKENS`` tokens, captured on first use and again after its cache grows (a graph reads
the cache tensors it was captured with). Eager, a 1B draft model's step costs several times
its weights' reading time in launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from truffula.device import host_tensor
from truffula.forward import ForwardContext, forward_context
from truffula.layers.attention import Attention
from truffula.layers.linear import pack_cpu_linears
from truffula.model_store.resolve import resolve_model
from truffula.models.common import CausalLM
from truffula.models.registry import LoadedModel, load_model
from truffula.scheduler.output import PLACEHOLDER, ScheduledSeq
from truffula.speculative.draft_cache import DraftCache, DraftSeq

CATCH_UP_TOKENS = 1024
"""Tokens one catch-up forward feeds at most (over all requests; each gets at least one)."""

GRAPH_TOKENS = 256
"""Tokens of the largest catch-up step replayed as a CUDA graph (larger ones run eagerly)."""

FLAG = "--speculative-config"


class StepPreparer(Protocol):
    """A model's step inputs from scheduled sequences (``runner.context.StepBuilder``)."""

    def prepare(
        self, seqs: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]: ...


class StepGraphRunner(Protocol):
    """CUDA graphs of a model's steps (``runner.graphs.StepGraphs``)."""

    def fits(self, seqs: list[ScheduledSeq]) -> bool: ...
    def run(
        self, seqs: list[ScheduledSeq], fill: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor: ...


class Target(Protocol):
    """What the draft model follows of the target's runner (``runner.ModelRunner``)."""

    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    """The target's KV blocks: the draft's cache never holds more."""
    max_len: int
    packed_linears: bool
    """Whether the target runs (some) linears oneDNN-packed on CPU; the draft then picks its
    own by measurement (``--cpu-linear auto``)."""

    def steps_for(self, model: torch.nn.Module) -> StepPreparer: ...
    def graphs_for(
        self, model: torch.nn.Module, max_len: int, mixed_tokens: int
    ) -> StepGraphRunner | None: ...


def preload(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int | None,
    progress: bool = False,
) -> LoadedModel:
    """The draft model's weights on ``device``. The engine loads them before sizing the
    target's KV cache, which on a GPU takes a share of the memory left: loaded after it, the
    draft would have to fit in the share left over."""
    return load_model(resolve_model(name, progress=progress), dtype, device, max_len)


class DraftModel:
    def __init__(self, model: CausalLM, max_len: int, target: Target) -> None:
        self.model = model
        self.max_len = min(max_len, target.max_len)
        self.device = target.device
        self.dtype = target.dtype
        attn = [m for m in model.modules() if isinstance(m, Attention)]
        self.steps = target.steps_for(model)
        self.cache = DraftCache(attn, target.block_size, target.num_blocks, self.device, self.dtype)
        self.seqs: dict[str, DraftSeq] = {}
        self.target = target
        self.graphs = target.graphs_for(model, self.max_len, GRAPH_TOKENS)
        self._graph_blocks = self.cache.num_blocks
        """The cache size the graphs were made for."""

    @classmethod
    def load(
        cls, name: str, target: Target, progress: bool = False, loaded: LoadedModel | None = None
    ) -> DraftModel:
        """The draft model ``name`` (folder or hub id) beside ``target`` (``loaded``: its
        weights, already on the device: ``preload``); ValueError naming the flag when it
        cannot draft for it (another vocabulary size, no native implementation)."""
        if loaded is None:
            loaded = preload(name, target.device, target.dtype, target.max_len, progress)
        vocab = int(loaded.hf_config.vocab_size)
        if vocab != target.vocab_size:
            raise ValueError(
                f"{FLAG}: the draft model {name!r} has a vocabulary of {vocab} tokens, the "
                f"target {target.vocab_size}; a draft model must share the target's tokenizer"
            )
        if loaded.serving_path != "native":
            raise ValueError(
                f"{FLAG}: the draft model's architecture {loaded.architecture!r} has no native "
                "implementation (a draft model needs the paged KV cache)"
            )
        model = loaded.model
        if target.device.type == "cpu" and target.packed_linears:
            pack_cpu_linears(model.linear_modules(), "auto", target.dtype)
        return cls(model, loaded.max_len, target)

    # ---------------------------------------------------------------- requests
    def release(self, request_id: str) -> None:
        """Free what the draft model holds of a request (finished, aborted, preempted)."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.cache.release(seq)

    def retain(self, request_ids: set[str]) -> None:
        """Free every request's state but those of ``request_ids``."""
        for rid in [r for r in self.seqs if r not in request_ids]:
            self.release(rid)

    # ---------------------------------------------------------------- drafts
    @torch.inference_mode()
    def propose(self, wanted: Sequence[tuple[str, Sequence[int], int]]) -> dict[str, list[int]]:
        """Greedy drafts by request, for each (request id, its tokens, drafts it can take);
        a request the cache has no room for gets none (and its state is freed)."""
        rows: list[tuple[str, DraftSeq, list[int], int]] = []
        for rid, tokens, room in wanted:
            room = min(room, self.max_len - len(tokens))
            if room <= 0 or not tokens:
                continue
            seq = self._sync(rid, tokens)
            if not self.cache.reserve(seq, len(tokens) + room - 1):
                self.release(rid)
                continue
            rows.append((rid, seq, list(tokens[len(seq.tokens) :]), room))
        if not rows:
            return {}
        # rows by room, most first, so each single-token step's rows are the first of the step
        # before; every step is fed the last one's argmax on the device, so the catch-up and
        # the steps queue up without waiting, and one read at the end brings all drafts back
        rows.sort(key=lambda row: -row[3])
        last = self._catch_up(rows)
        outs = [last]
        for i in range(1, rows[0][3]):
            live = [seq for _, seq, _, room in rows if room > i]
            last = self._forward([(seq, [PLACEHOLDER]) for seq in live], last[: len(live)])
            outs.append(last)
        flat = iter(torch.cat(outs).tolist())
        drafts = {rid: [next(flat)] for rid, *_ in rows}
        for i in range(1, rows[0][3]):
            for rid, seq, _, room in rows:
                if room > i:
                    seq.tokens[len(seq.tokens) - room + i] = drafts[rid][-1]  # fed
                    drafts[rid].append(next(flat))
        return drafts

    def _sync(self, request_id: str, tokens: Sequence[int]) -> DraftSeq:
        """The request's state, its cache cut back to the longest prefix it shares with
        ``tokens`` (at most all but the last token: its logits give the first draft)."""
        seq = self.seqs.get(request_id)
        if seq is None:
            seq = self.seqs[request_id] = DraftSeq()
        limit = min(len(seq.tokens), len(tokens) - 1)
        n = min(seq.confirmed, limit)
        while n < limit and seq.tokens[n] == tokens[n]:
            n += 1
        self.cache.truncate(seq, n)
        seq.confirmed = len(tokens)  # every known token will be in the cache after this call
        return seq

    def _catch_up(self, rows: list[tuple[str, DraftSeq, list[int], int]]) -> torch.Tensor:
        """Feed each row's unseen tokens (in forwards of at most ``CATCH_UP_TOKENS`` tokens);
        the argmax after each row's last token, in ``rows``' order, on the device."""
        pending = {i: (seq, new) for i, (_, seq, new, _) in enumerate(rows)}
        first: torch.Tensor | None = None
        while pending:
            budget = CATCH_UP_TOKENS
            feed: list[tuple[int, DraftSeq, list[int]]] = []
            for i, (seq, new) in pending.items():
                take = max(1, min(len(new), budget))
                budget -= take
                feed.append((i, seq, new[:take]))
            argmax = self._forward([(seq, part) for _, seq, part in feed])
            done: list[tuple[int, int]] = []  # (row, its place in this forward)
            for j, (i, seq, part) in enumerate(feed):
                rest = pending[i][1][len(part) :]
                if rest:
                    pending[i] = (seq, rest)
                else:
                    del pending[i]
                    done.append((i, j))
            if first is None and len(done) == len(rows):  # all in one forward, in order
                return argmax
            if first is None:
                first = torch.empty(len(rows), dtype=argmax.dtype, device=self.device)
            if done:
                rows_done = host_tensor([i for i, _ in done], torch.long, self.device)
                places = host_tensor([j for _, j in done], torch.long, self.device)
                first.index_copy_(0, rows_done, argmax[places])
        assert first is not None
        return first

    def _forward(
        self, feed: list[tuple[DraftSeq, list[int]]], fill: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Append each sequence's tokens to its cache in one forward; the argmax of the logits
        after each one's last token, in ``feed``'s order, on the device. ``fill``: the tokens
        of a step of single tokens (``PLACEHOLDER``s in ``feed``), on the device."""
        order = sorted(range(len(feed)), key=lambda i: len(feed[i][1]) > 1)  # decodes first
        steps = [
            ScheduledSeq("", new, len(seq.tokens), seq.blocks, True)
            for seq, new in (feed[i] for i in order)
        ]
        for seq, new in feed:
            seq.tokens += new
        placed = None if fill is None else (torch.arange(len(feed), device=self.device), fill)
        graphs = self._graphs()
        if graphs is not None and graphs.fits(steps):
            hidden = graphs.run(steps, placed)
        else:
            input_ids, positions, ctx = self.steps.prepare(steps)
            if placed is not None:
                input_ids.index_copy_(0, *placed)
            with forward_context(ctx):
                hidden = self.model(input_ids, positions)
        ends = [0]
        for step in steps:
            ends.append(ends[-1] + step.num_tokens)
        last = host_tensor(ends[1:], torch.long, self.device) - 1
        best = self.model.compute_logits(hidden[last]).argmax(dim=-1)
        if order == sorted(order):
            return best
        back = [0] * len(order)  # feed index -> row of ``best``
        for j, i in enumerate(order):
            back[i] = j
        return best[host_tensor(back, torch.long, self.device)]

    def _graphs(self) -> StepGraphRunner | None:
        """The draft's CUDA graphs, made again once its cache has grown since their capture."""
        if self.graphs is not None and self._graph_blocks != self.cache.num_blocks:
            self.graphs = self.target.graphs_for(self.model, self.max_len, GRAPH_TOKENS)
            self._graph_blocks = self.cache.num_blocks
        return self.graphs
