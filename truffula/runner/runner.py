"""The model runner: SchedulerOutput (plain data) -> device tensors -> model -> sampler -> RunnerOutput.

Steps of ``launch`` (which returns without waiting for the device):
1. gather the sampling parameters of the rows that sample from each sequence's sampling state
   (``ScheduledSeq.sampling``, owned by the engine's record of the request);
2. ``prepare``: flatten the scheduled tokens, positions and cache slots into one ForwardBatch
   (``PLACEHOLDER`` tokens are read from the previous step's samples on the device);
3. run the model under ``forward_context`` and compute logits only for rows that sample;
4. sample (``truffula.sampling.sampler``) and, for requests that asked, prompt logprobs over
   the prefill hidden states in chunks of positions;
5. issue one device-to-host copy of everything the engine needs.
``collect`` waits for that copy and turns it into plain lists.

The runner keeps no per-request state: each step's plain data carries what it needs (tokens,
blocks, adapter slot, and a reference to the request's ``SamplingState``: parameters, RNG,
grammar matcher, the token history penalties count); ``release`` drops what the model itself
keeps of a finished request (the transformers fallback's caches). It never sees the tokenizer.

At start-up it sizes and allocates the paged KV cache (``truffula.runner.sizing``; on CUDA with
no size given, after profiling the heaviest step on a one-block cache) and exposes the outcome
as ``sizing`` (``EngineSizing``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from truffula.config import EngineConfig
from truffula.device import host_tensor
from truffula.forward import ForwardContext, forward_context
from truffula.kernels.select import select_kernels
from truffula.kernels.stats_torch import TokenStats
from truffula.layers.attention import Attention
from truffula.layers.linear import pack_cpu_linears, quantize_linears
from truffula.layers.rotary import RotaryEmbedding
from truffula.models.decode_cpu import FusedDecode
from truffula.models.registry import LoadedModel
from truffula.runner.context import StepBuilder
from truffula.runner.graphs import StepGraphs
from truffula.runner.kv_cache import KVCache, size_kv_cache
from truffula.runner.launched import Fill, Launched, PromptJob, kept_rows, placeholder_fill
from truffula.runner.output import RunnerOutput, SeqOutput
from truffula.runner.results import records, to_host_async
from truffula.runner.sizing import profile_layout
from truffula.sampling.metadata import SamplingBatch, build_sampling_batch
from truffula.sampling.params import SamplingParams
from truffula.sampling.sampler import Sampler, SamplerOutput
from truffula.sampling.state import SamplingState
from truffula.scheduler.output import ScheduledSeq, SchedulerOutput

log = logging.getLogger("truffula.runner")


class ModelRunner:
    prompt_records_k = 0
    """Least k of prompt-logprob alternatives computed (the prefix cache keeps records this
    wide, the engine cuts them to each request's k)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        prompt_stats: TokenStats | None = None,
    ):
        """``prompt_stats``: what computes prompt tokens' statistics (the device's kernels by
        default; a tensor-parallel rank's merge them over the vocabulary's slices)."""
        given = config
        # the batching limits left unset, filled in for the device
        self.config = config = config.for_device(device.type)
        self.model = loaded.model
        self.device = device
        self.dtype = dtype
        hf = loaded.hf_config
        self.vocab_size = int(hf.vocab_size)
        self.block_size = config.cache.block_size
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.max_len = loaded.max_len
        self.kernels = select_kernels(device, dtype)  # the one the model was loaded with
        if config.model.quantization:  # before packing: quantized linears are not packed
            quantize_linears(self.model, config.model.quantization, self.kernels)
        for m in self.model.linear_modules():
            m.int4_grids.clear()  # a 4-bit checkpoint's grids: used by int4 or not at all
        self.packed_linears = device.type == "cpu" and bool(
            pack_cpu_linears(self.model.linear_modules(), config.model.linear_kernel, dtype)
        )
        self.sampler = Sampler(self.kernels.stats)
        self.prompt_stats = prompt_stats or self.kernels.stats
        self.steps = self.steps_for(self.model)
        self.graphs: StepGraphs | None = None
        graph_batch = config.model.cuda_graph_max_batch or 0
        if (
            device.type == "cuda"
            and config.model.cuda_graphs
            and graph_batch > 0
            and self.kernels.graph_safe
            and not getattr(self.model, "is_fallback", False)
        ):
            cap = config.scheduler.max_prefill_while_decoding or 0
            if not self._mixed_graph_safe(self.model):
                if given.scheduler.max_prefill_while_decoding is None:
                    cap = 0  # an eager step with a prefill chunk costs several decode steps
                    self.config = config = replace(
                        config, scheduler=replace(config.scheduler, max_prefill_while_decoding=0)
                    )
                mixed = 0
            else:
                mixed = graph_batch + cap if cap else 0
            self.graphs = self._new_graphs(self.model, self.steps, graph_batch, self.max_len, mixed)
        elif device.type == "cuda" and given.scheduler.max_prefill_while_decoding is None:
            self.config = config = replace(
                config, scheduler=replace(config.scheduler, max_prefill_while_decoding=0)
            )
        self.kv_cache = KVCache(self.attn_layers, self.block_size, device, dtype)
        self.sizing = size_kv_cache(
            self.kv_cache, config, given, loaded.max_len, self.graphs, self._profile_step
        )
        self.num_blocks = self.sizing.num_blocks + 1  # + the null block
        self.kv_cache.allocate(self.num_blocks)
        self.fused_decode = FusedDecode.bind(self.model, dtype) if device.type == "cpu" else None
        """Each step in one native call on CPU (``models.decode_cpu``), or None."""

    def _mixed_graph_safe(self, model: torch.nn.Module) -> bool:
        """Whether steps with prefill chunks of ``model`` can be captured: every attention
        reads the query layout from device memory, and no rotary embedding picks its factors
        per sequence on the host (longrope)."""
        attn = [m for m in model.modules() if isinstance(m, Attention)]
        rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
        return bool(attn) and (
            all(self.kernels.mixed_graph_safe(a.head_dim) for a in attn)
            and all(getattr(r, "_long", None) is None for r in rotaries)
        )

    def steps_for(self, model: torch.nn.Module) -> StepBuilder:
        """The step inputs of another model (the draft model's) on this runner's device."""
        return StepBuilder(model, self.kernels, self.block_size, self.dtype)

    def graphs_for(
        self, model: torch.nn.Module, max_len: int, mixed_tokens: int
    ) -> StepGraphs | None:
        """CUDA graphs of another model's steps on this runner's device and kernels (the draft
        model's), when this runner replays its own: decodes up to the running-request cap and,
        where the model allows it, steps of up to ``mixed_tokens`` tokens. Captured on first
        use; they read the KV cache that model's layers hold at capture."""
        if self.graphs is None:
            return None
        mixed = mixed_tokens if self._mixed_graph_safe(model) else 0
        return self._new_graphs(model, self.steps_for(model), self.graphs.sizes[-1], max_len, mixed)

    def _new_graphs(
        self, model: torch.nn.Module, steps: StepBuilder, batch: int, max_len: int, mixed: int
    ) -> StepGraphs:
        first = next(m for m in model.modules() if isinstance(m, Attention))
        heads = (first.num_heads, first.num_kv_heads)
        return StepGraphs(model, steps, batch, max_len, self.block_size, mixed, heads)

    def capture_graphs(self) -> None:
        """Capture the decode graphs (after LoRA wrapping, so adapters can join a graph)."""
        if self.graphs is not None:
            self.graphs.capture_all()

    # ---------------------------------------------------------------- set-up
    @torch.inference_mode()
    def _profile_step(self) -> None:
        """Run the heaviest step the scheduler can make (``profile_layout``): every sequence
        samples with every filter and penalty and the largest k of alternatives, and one asks
        for prompt logprobs."""
        cfg = self.config
        budget = cfg.scheduler.max_num_batched_tokens or 1
        seqs_cap = cfg.scheduler.max_num_seqs or 1
        k = cfg.limits.max_k_alternatives
        heavy = SamplingParams(
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            typical_p=0.95,
            min_p=0.01,
            repetition_penalty=1.1,
            frequency_penalty=0.1,
            presence_penalty=0.1,
            return_k_alternatives=k,
        )
        table = [0] * -(-self.max_len // self.block_size)
        seqs = []
        for i, (start, n) in enumerate(profile_layout(budget, seqs_cap, self.max_len)):
            rid = f"__profile_{i}"
            params = heavy if n == 1 else heavy.with_updates(prompt_k_alternatives=k)
            state = SamplingState(params, [0] * (start + n))
            seqs.append(ScheduledSeq(rid, [0] * n, start, table, True, sampling=state))
        graphs, self.graphs = self.graphs, None  # eager, however the step looks
        try:
            self.collect(self.launch(SchedulerOutput(seqs)))
        finally:
            self.graphs = graphs

    # ---------------------------------------------------------------- requests
    def release(self, request_id: str) -> None:
        """A request finished: drop what the model keeps of it (the fallback's caches)."""
        release = getattr(self.model, "release", None)
        if release is not None:
            release(request_id)

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, prev: Launched | None = None, defer_sampling: bool = False
    ) -> Launched:
        """Issue the step's device work and the copy of its results to the host; returns
        without waiting for them. ``PLACEHOLDER`` tokens are read from ``prev``'s samples on
        the device. ``defer_sampling``: issue the forward pass and the logits only; the sampler
        runs at ``sample`` (after the caller has read ``prev``'s tokens into the requests'
        sampling states: penalties and grammar masks follow them)."""
        if sched.is_empty:
            return Launched(sched, [], [], False, list)
        starts = [0]
        for s in sched.seqs:
            starts.append(starts[-1] + s.num_tokens)
        # one sampled row per sampling sequence; a sequence with drafts samples every position
        # from its last known token on, each over the history with the drafts before it
        sample_idx: list[int] = []
        last_rows: list[int] = []
        drafted: list[list[int]] = []
        for i, s in enumerate(sched.seqs):
            if s.sample:
                first = starts[i + 1] - 1 - s.num_drafts
                drafts = s.token_ids[len(s.token_ids) - s.num_drafts :]
                for j in range(s.num_drafts + 1):
                    sample_idx.append(i)
                    last_rows.append(first + j)
                    drafted.append(drafts[:j])
        states = [_sampling(sched.seqs[i]) for i in sample_idx]
        # built before the forward, so its host-to-device copies overlap it
        batch = None if defer_sampling or not states else self._batch(states, drafted)
        jobs = self._prompt_jobs(sched.seqs, starts)
        for job in jobs:
            job.tensors = (
                host_tensor(job.rows, torch.long, self.device),
                host_tensor(job.targets, torch.long, self.device),
            )
        contiguous = last_rows == list(range(len(last_rows)))  # decodes come first
        row_index = None if contiguous else host_tensor(last_rows, torch.long, self.device)
        fill = placeholder_fill(sched.seqs, starts, prev, self.device)
        # every host-to-device copy of the step is issued above; after the forward pass the
        # only synchronisation is the one copy of results back to the host
        hidden = self._forward(sched.seqs, fill)
        logits = None
        if states:
            rows = hidden[: len(last_rows)] if row_index is None else hidden[row_index]
            logits = self.model.compute_logits(rows)
        job_parts = [part for job in jobs for part in self._prompt_logprobs(hidden, job)]
        ks = [st.params.return_k_alternatives for st in states]  # as launched
        launched = Launched(sched, sample_idx, jobs, False, list, None, ks)
        launched.pending = (logits, states, drafted, job_parts)
        if not defer_sampling:
            self.sample(launched, batch)
        return launched

    @torch.inference_mode()
    def sample(self, launched: Launched, batch: SamplingBatch | None = None) -> None:
        """Sample a launched step's rows (unless done) and issue the copy of its results."""
        if launched.pending is None:
            return
        logits, states, drafted, job_parts = launched.pending
        launched.pending = None
        device_parts: list[torch.Tensor] = []
        if logits is not None:
            out = self._sample_logits(logits, states, drafted, batch)
            launched.sampled = out.sampled
            device_parts.append(out.sampled)
            if out.logprobs is not None:
                launched.has_lp = True
                lp = out.logprobs
                device_parts += [lp.rows, lp.token_ids, lp.logprobs, lp.ranks, lp.entropy]
        launched.host = to_host_async(device_parts + job_parts)

    def _sample_logits(
        self,
        logits: torch.Tensor,
        states: list[SamplingState],
        drafted: list[list[int]],
        batch: SamplingBatch | None,
    ) -> SamplerOutput:
        return self.sampler(logits, batch or self._batch(states, drafted))

    def _batch(self, states: list[SamplingState], drafted: list[list[int]]) -> SamplingBatch:
        return build_sampling_batch(
            [st.params for st in states],
            [st.prompt_ids for st in states],
            [
                st.output_ids + d if d else st.output_ids
                for st, d in zip(states, drafted, strict=True)
            ],
            [st.generator for st in states],
            self.vocab_size,
            self.device,
            [st.constraint for st in states],
        )

    def collect(self, launched: Launched) -> RunnerOutput:
        """Wait for a launched step's results and turn them into plain data."""
        if launched.sched.is_empty:
            return RunnerOutput([])
        self.sample(launched)
        return self._unpack(launched, launched.host())

    def prepare(
        self, seqs: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """(input ids, positions, forward context) of a step's flattened tokens."""
        return self.steps.prepare(seqs)

    # ---------------------------------------------------------------- prompt logprobs
    def _forward(self, seqs: list[ScheduledSeq], fill: Fill | None) -> torch.Tensor:
        """Hidden states of the step's tokens: a CUDA graph replay for decode-only steps."""
        if self.graphs is not None and self.graphs.fits(seqs):
            return self.graphs.run(seqs, fill)
        input_ids, positions, ctx = self.steps.prepare(seqs)
        if fill is not None:
            input_ids.index_copy_(0, fill[0], fill[1])
        with forward_context(ctx):
            if self.fused_decode is not None:
                hidden = self.fused_decode(input_ids, ctx)
                if hidden is not None:
                    return hidden
            return self.model(input_ids, positions)

    def _prompt_jobs(self, seqs: list[ScheduledSeq], starts: list[int]) -> list[PromptJob]:
        jobs = []
        for i, s in enumerate(seqs):
            st = s.sampling
            if st is None or not st.params.wants_prompt_logprobs:
                continue
            plen = len(st.prompt_ids)
            # logits at position p predict the token at p + 1; this chunk holds positions
            # [start, start + n), so it can report targets [start + 1, start + n] within the prompt.
            first = max(s.start_pos + 1, st.prompt_lp_next)
            last = min(s.start_pos + s.num_tokens, plen - 1)
            if first > last:
                continue
            base = starts[i] - s.start_pos
            rows = [base + t - 1 for t in range(first, last + 1)]
            k = max(st.params.prompt_k_alternatives, self.prompt_records_k)
            jobs.append(PromptJob(i, rows, st.prompt_ids[first : last + 1], first, k))
            st.prompt_lp_next = last + 1
        return jobs

    def _prompt_logprobs(self, hidden: torch.Tensor, job: PromptJob) -> list[torch.Tensor]:
        """Raw logprob stats of prompt targets, materializing at most ``chunk`` logit rows at once."""
        chunk = self.config.limits.prompt_logprobs_chunk
        assert job.tensors is not None
        rows, targets = job.tensors
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for lo in range(0, len(job.rows), chunk):
            logits = self.model.compute_logits(hidden[rows[lo : lo + chunk]]).float()
            stats = self.prompt_stats.stats(logits, targets[lo : lo + chunk], job.k)
            for acc, t in zip(parts, stats, strict=True):
                acc.append(t)
            del logits
        return [torch.cat(p) for p in parts]

    # ---------------------------------------------------------------- results
    def _unpack(self, launched: Launched, host: list[np.ndarray]) -> RunnerOutput:
        """Plain records of a step's results; the engine reads each sampled token into the
        request's sampling state (``SamplingState.accept``)."""
        seqs, sample_idx = launched.sched.seqs, launched.sample_idx
        outs = [SeqOutput(s.request_id, None) for s in seqs]
        it = iter(host)
        if sample_idx:
            sampled = next(it).astype(np.int64).tolist()
            kept = kept_rows(seqs, sample_idx, sampled)
            for r, (i, tok) in enumerate(zip(sample_idx, sampled, strict=True)):
                if not kept[r]:
                    continue
                if outs[i].sampled is None:
                    outs[i].sampled = tok
                else:
                    outs[i].accepted.append(tok)
            if launched.has_lp:
                rows, ids, lps, ranks, ents = (next(it) for _ in range(5))
                ks = [launched.ks[int(r)] for r in rows]  # each row's k when it was launched
                for r, rec in zip(
                    rows.astype(np.int64).tolist(), records(ids, lps, ranks, ents, ks), strict=True
                ):
                    if not kept[r]:
                        continue
                    out = outs[sample_idx[r]]
                    if r == 0 or sample_idx[r - 1] != sample_idx[r]:
                        out.logprobs = rec
                    else:
                        out.accepted_logprobs.append(rec)
        for job in launched.jobs:
            ids, lps, ranks, ents = (next(it) for _ in range(4))
            outs[job.seq_index].prompt_logprobs = records(
                ids, lps, ranks, ents, [job.k] * len(ranks)
            )
            outs[job.seq_index].prompt_logprobs_start = job.first_pos
        return RunnerOutput(outs)


def _sampling(seq: ScheduledSeq) -> SamplingState:
    assert seq.sampling is not None, f"{seq.request_id} samples without a sampling state"
    return seq.sampling
