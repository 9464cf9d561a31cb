"""The model runner: SchedulerOutput (plain data) -> device tensors -> model -> sampler -> RunnerOutput.

Steps of ``launch`` (which returns without waiting for the device):
1. drop the state of requests that left;
2. ``prepare``: flatten the scheduled tokens, positions and cache slots into one ForwardBatch
   (``PLACEHOLDER`` tokens are read from the previous step's samples on the device);
3. run the model under ``forward_context`` and compute logits only for rows that sample;
4. sample (``truffula.sampling.sampler``) and, for requests that asked, prompt logprobs over
   the prefill hidden states in chunks of positions;
5. issue one device-to-host copy of everything the engine needs.
``collect`` waits for that copy and turns it into plain lists.

The runner keeps per-request state (prompt, outputs so far, sampling params, RNG) keyed by
request id; it never sees the tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from truffula.config import EngineConfig
from truffula.device import host_tensor, to_device
from truffula.kernels import linear_cpu, triton_kernels
from truffula.kernels.lora_torch import LoRABatch
from truffula.layers.attention import Attention
from truffula.models.registry import LoadedModel
from truffula.runner.context import AttentionMetadata, ForwardContext, forward_context
from truffula.runner.graphs import DecodeGraphs
from truffula.runner.output import RunnerOutput, SeqOutput, TokenLogprobs
from truffula.sampling.metadata import build_sampling_batch
from truffula.sampling.params import SamplingParams
from truffula.sampling.sampler import Sampler, stats_of_logits
from truffula.scheduler.output import PLACEHOLDER, ScheduledSeq, SchedulerOutput

log = logging.getLogger("truffula.runner")


@dataclass
class RequestState:
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    prompt_lp_next: int = 1
    """Next prompt position whose logprob is still to be reported."""


@dataclass
class _PromptJob:
    seq_index: int
    rows: list[int]
    """Hidden-state rows (in the step's flattened tokens) predicting the targets."""
    targets: list[int]
    first_pos: int
    k: int
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None
    """rows and targets on the device, copied before the forward pass (no sync after it)."""


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, device: torch.device, dtype: torch.dtype
    ):
        self.model = loaded.model
        self.device = device
        self.dtype = dtype
        self.config = config
        hf = loaded.hf_config
        self.vocab_size = int(hf.vocab_size)
        self.block_size = config.cache.block_size
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._num_blocks(loaded.max_len)
        self.max_len = min(loaded.max_len, (self.num_blocks - 1) * self.block_size)
        self._allocate_cache()
        kind = config.model.linear_kernel
        self.packed_linears = (
            device.type == "cpu" and kind != "torch" and linear_cpu.available(dtype)
        )
        if kind == "packed" and not self.packed_linears:
            log.warning("packed linears are not available here; using F.linear")
        if self.packed_linears:
            for lin in self.model.linear_modules():
                lin.pack_for_cpu()
        self.sampler = Sampler()
        self.states: dict[str, RequestState] = {}
        self.graphs: DecodeGraphs | None = None
        if (
            device.type == "cuda"
            and config.model.cuda_graphs
            and triton_kernels.ENABLED
            and not getattr(self.model, "is_fallback", False)
        ):
            self.graphs = DecodeGraphs(
                self.model, device, config.scheduler.max_num_seqs, self.max_len, self.block_size
            )

    def capture_graphs(self) -> None:
        """Capture the decode graphs (after LoRA wrapping, so adapters can join a graph)."""
        if self.graphs is not None:
            self.graphs.capture_all()

    # ---------------------------------------------------------------- set-up
    def _kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attn_layers) * elem
        return per_token * self.block_size

    def _num_blocks(self, max_len: int) -> int:
        if self.config.cache.num_blocks is not None:
            return self.config.cache.num_blocks + 1  # + the null block
        per_block = self._kv_bytes_per_block()
        if per_block == 0:  # the transformers fallback keeps its own caches: blocks only count
            return 1 + self.config.scheduler.max_num_seqs * -(-max_len // self.block_size)
        return max(2, self.config.cache.kv_cache_memory // per_block)

    def _allocate_cache(self) -> None:
        from truffula.kernels.select import attention_impl

        impl = attention_impl(self.device)
        slots = self.num_blocks * self.block_size
        for a in self.attn_layers:
            k = torch.zeros(slots, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
            a.bind_cache(k, torch.zeros_like(k), impl)

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        self.states[request_id] = RequestState(list(prompt_ids), params, generator=gen)

    def remove_request(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        release = getattr(self.model, "release", None)
        if release is not None:
            release(request_id)

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: Launched | None = None) -> Launched:
        """Issue the step's device work and the copy of its results to the host; returns
        without waiting for them. ``PLACEHOLDER`` tokens are read from ``prev``'s samples on
        the device."""
        for rid in sched.finished_ids:
            self.states.pop(rid, None)
        if sched.is_empty:
            return Launched(sched, [], [], False, list)
        starts = [0]
        for s in sched.seqs:
            starts.append(starts[-1] + s.num_tokens)
        sample_idx = [i for i, s in enumerate(sched.seqs) if s.sample]
        batch = None
        if sample_idx:  # built before the forward, so its host-to-device copies overlap it
            states = [self._state(sched.seqs[i].request_id) for i in sample_idx]
            batch = build_sampling_batch(
                [st.params for st in states],
                [st.prompt_ids for st in states],
                [st.output_ids for st in states],
                [st.generator for st in states],
                self.vocab_size,
                self.device,
            )
        jobs = self._prompt_jobs(sched.seqs, starts)
        for job in jobs:
            job.tensors = (
                host_tensor(job.rows, torch.long, self.device),
                host_tensor(job.targets, torch.long, self.device),
            )
        last_rows = [starts[i + 1] - 1 for i in sample_idx]
        contiguous = last_rows == list(range(len(last_rows)))  # decodes come first
        row_index = None if contiguous else host_tensor(last_rows, torch.long, self.device)
        fill = _placeholder_fill(sched.seqs, starts, prev, self.device)
        # every host-to-device copy of the step is issued above; after the forward pass the
        # only synchronisation is the one copy of results back to the host
        hidden = self._forward(sched.seqs, fill)
        device_parts: list[torch.Tensor] = []
        sampled = None
        has_lp = False
        if batch is not None:
            rows = hidden[: len(last_rows)] if row_index is None else hidden[row_index]
            out = self.sampler(self.model.compute_logits(rows), batch)
            sampled = out.sampled
            device_parts.append(sampled)
            if out.logprobs is not None:
                has_lp = True
                lp = out.logprobs
                device_parts += [lp.rows, lp.token_ids, lp.logprobs, lp.ranks, lp.entropy]
        for job in jobs:
            device_parts += self._prompt_logprobs(hidden, job)
        return Launched(sched, sample_idx, jobs, has_lp, _to_host_async(device_parts), sampled)

    def collect(self, launched: Launched) -> RunnerOutput:
        """Wait for a launched step's results and turn them into plain data."""
        if launched.sched.is_empty:
            return RunnerOutput([])
        host = launched.host()
        return self._unpack(
            launched.sched.seqs, launched.sample_idx, launched.has_lp, launched.jobs, host
        )

    def _state(self, request_id: str) -> RequestState:
        """A request's state; one that left while its step was being scheduled (asynchronous
        scheduling) computes a throw-away greedy token."""
        st = self.states.get(request_id)
        return st if st is not None else _GONE

    def prepare(
        self, seqs: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
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
        return host_tensor(tokens, torch.long, dev), to_device(pos, dev), meta

    # ---------------------------------------------------------------- prompt logprobs
    def _forward(self, seqs: list[ScheduledSeq], fill: Fill | None) -> torch.Tensor:
        """Hidden states of the step's tokens: a CUDA graph replay for decode-only steps."""
        if self.graphs is not None and self.graphs.fits(seqs):
            return self.graphs.run(seqs, fill)
        input_ids, positions, meta = self.prepare(seqs)
        if fill is not None:
            input_ids.index_copy_(0, fill[0], fill[1])
        slots = [s.adapter_slot for s in seqs for _ in range(s.num_tokens)]
        with forward_context(ForwardContext(meta, LoRABatch.build(slots, self.device))):
            return self.model(input_ids, positions)

    def _prompt_jobs(self, seqs: list[ScheduledSeq], starts: list[int]) -> list[_PromptJob]:
        jobs = []
        for i, s in enumerate(seqs):
            st = self.states[s.request_id]
            if not st.params.wants_prompt_logprobs:
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
            jobs.append(
                _PromptJob(
                    i, rows, st.prompt_ids[first : last + 1], first, st.params.prompt_k_alternatives
                )
            )
            st.prompt_lp_next = last + 1
        return jobs

    def _prompt_logprobs(self, hidden: torch.Tensor, job: _PromptJob) -> list[torch.Tensor]:
        """Raw logprob stats of prompt targets, materializing at most ``chunk`` logit rows at once."""
        chunk = self.config.limits.prompt_logprobs_chunk
        assert job.tensors is not None
        rows, targets = job.tensors
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for lo in range(0, len(job.rows), chunk):
            logits = self.model.compute_logits(hidden[rows[lo : lo + chunk]]).float()
            stats = stats_of_logits(logits, targets[lo : lo + chunk], job.k)
            for acc, t in zip(parts, stats, strict=True):
                acc.append(t)
            del logits
        return [torch.cat(p) for p in parts]

    # ---------------------------------------------------------------- results
    def _unpack(
        self,
        seqs: list[ScheduledSeq],
        sample_idx: list[int],
        has_lp: bool,
        jobs: list[_PromptJob],
        host: list[np.ndarray],
    ) -> RunnerOutput:
        outs = [SeqOutput(s.request_id, None) for s in seqs]
        it = iter(host)
        if sample_idx:
            sampled = next(it).astype(np.int64).tolist()
            for i, tok in zip(sample_idx, sampled, strict=True):
                outs[i].sampled = tok
                st = self.states.get(seqs[i].request_id)
                if st is not None:
                    st.output_ids.append(tok)
            if has_lp:
                rows, ids, lps, ranks, ents = (next(it) for _ in range(5))
                ks = [
                    self._state(seqs[sample_idx[int(r)]].request_id).params.return_k_alternatives
                    for r in rows
                ]
                for r, rec in zip(
                    rows.astype(np.int64).tolist(), _records(ids, lps, ranks, ents, ks), strict=True
                ):
                    outs[sample_idx[r]].logprobs = rec
        for job in jobs:
            ids, lps, ranks, ents = (next(it) for _ in range(4))
            outs[job.seq_index].prompt_logprobs = _records(
                ids, lps, ranks, ents, [job.k] * len(ranks)
            )
            outs[job.seq_index].prompt_logprobs_start = job.first_pos
        return RunnerOutput(outs)


def _records(
    ids: np.ndarray, lps: np.ndarray, ranks: np.ndarray, ents: np.ndarray, ks: list[int]
) -> list[TokenLogprobs]:
    """Rows of [chosen | top-k] ids and logprobs -> records; -inf entries (tokens a processed
    distribution filtered out) are never listed, and no -inf / NaN logprob leaves the engine."""
    chosen = np.where(lps[:, 0] > -1e30, lps[:, 0], -9999.0).tolist()
    ents = np.where(np.isnan(ents), 0.0, ents).tolist()
    rank_list = ranks.astype(np.int64).tolist()
    id_rows = ids.astype(np.int64)
    finite = np.isfinite(lps)
    full = finite[np.arange(len(ks)), ks].tolist()  # the k-th alternative is finite
    id_list, lp_list = id_rows.tolist(), lps.tolist()
    out = []
    for r, k in enumerate(ks):
        if not full[r]:  # the row ran out of tokens: keep the finite prefix
            keep = finite[r, 1 : 1 + k]
            top_ids, top_lps = (
                id_rows[r, 1 : 1 + k][keep].tolist(),
                lps[r, 1 : 1 + k][keep].tolist(),
            )
        else:
            top_ids, top_lps = id_list[r][1 : 1 + k], lp_list[r][1 : 1 + k]
        out.append(TokenLogprobs(id_list[r][0], chosen[r], rank_list[r], ents[r], top_ids, top_lps))
    return out


Fill = tuple[torch.Tensor, torch.Tensor]
"""(token rows of this step, their ids on the device) for ``PLACEHOLDER`` tokens."""


@dataclass(eq=False)
class Launched:
    """A step whose device work and result copy are issued; ``host()`` waits for the copy."""

    sched: SchedulerOutput
    sample_idx: list[int]
    jobs: list[_PromptJob]
    has_lp: bool
    host: Callable[[], list[np.ndarray]]
    sampled: torch.Tensor | None = None
    """[len(sample_idx)] sampled ids on the device (the next step's placeholder tokens)."""


_GONE = RequestState([], SamplingParams(temperature=0.0))


def _placeholder_fill(
    seqs: list[ScheduledSeq], starts: list[int], prev: Launched | None, device: torch.device
) -> Fill | None:
    dst, src = [], []
    rows = None
    for i, s in enumerate(seqs):
        for j, tok in enumerate(s.token_ids):
            if tok != PLACEHOLDER:
                continue
            if rows is None:
                assert prev is not None and prev.sampled is not None, "placeholder without a step"
                rows = {prev.sched.seqs[k].request_id: r for r, k in enumerate(prev.sample_idx)}
            dst.append(starts[i] + j)
            src.append(rows[s.request_id])
    if not dst:
        return None
    assert prev is not None and prev.sampled is not None
    index = host_tensor([dst, src], torch.long, device)
    return index[0], prev.sampled.index_select(0, index[1])


def _to_host_async(parts: list[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
    """Issue one device-to-host copy of every result tensor; the returned function waits for
    it and splits it back into numpy arrays."""
    if not parts:
        return list
    if not parts[0].is_cuda:  # already on the host: no copy to batch
        arrays = [p.numpy() for p in parts]
        return lambda: arrays
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
    buf = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    buf.copy_(flat, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    shapes = [p.shape for p in parts]

    def wait() -> list[np.ndarray]:
        done.synchronize()
        host = buf.numpy()
        out, pos = [], 0
        for shape in shapes:
            n = int(np.prod(shape)) if len(shape) else 1
            out.append(host[pos : pos + n].reshape(shape))
            pos += n
        return out

    return wait
