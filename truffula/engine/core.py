"""The synchronous engine core: prepared requests in, one step at a time, numbers out.

A request's life (see docs/structure.md for the numbered version): the ``Frontend`` validates
and tokenizes it into an ``EngineRequest``; ``add`` makes its one record (``Request``, with its
``SamplingState``) and queues it in the scheduler; each ``step_outputs`` schedules a batch, runs
it (each scheduled sequence carries its sampling state to the runner), and turns the runner's
plain results into ``EngineOutput``s (token ids, their statistics, EOS and length); a finished or
aborted request leaves through ``_finish`` alone (scheduler: blocks, prefix-cache references,
adapter slot; the model's own caches; the adapter's user count; metrics). The engine reads the
scheduler's ``SeqState`` and reports to it through its methods, never writing it. In the server
this runs in the engine process (``truffula.engine.engine_proc``) and the frontend in the API
process; ``add_request`` and ``step`` run both here, for ``LLM`` and scripts (one thread only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from truffula.adapters.store import AdapterStore
from truffula.config import EngineConfig
from truffula.device import keep_host_memory, pick_device, pick_dtype
from truffula.distributed.launch import Ranks
from truffula.engine.detokenizer import TokenTable
from truffula.engine.frontend import Frontend
from truffula.engine.isolation import FaultInjector, StepIsolation
from truffula.engine.messages import EngineOutput, EngineRequest
from truffula.engine.output import RequestOutput
from truffula.engine.prefix import PromptCache, cut
from truffula.engine.request import InFlight, MetricsSink, Request
from truffula.engine.tokenizer import Tokenizer
from truffula.errors import EngineOverloadedError, RequestValidationError
from truffula.layers.lora import apply_lora
from truffula.model_store.resolve import resolve_model
from truffula.runner.output import SeqOutput
from truffula.runner.runner import Launched
from truffula.sampling.params import SamplingParams
from truffula.sampling.state import SamplingState
from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.output import SchedulerOutput
from truffula.scheduler.scheduler import Scheduler, SeqState
from truffula.speculative.drafter import Drafter

log = logging.getLogger("truffula.engine")


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        progress: bool = True,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config  # weights: a HF-named state dict for the folder's (benchmarks)
        files = weights is None and config.model.load_format != "dummy"
        folder = resolve_model(config.model.model, progress=progress, need_weights=files)
        self.device = pick_device(config.model.device)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        self.ranks = Ranks.start(config, folder, self.device, weights)  # tensor parallelism
        loaded = self.ranks.load(folder, self.dtype, self.device, config, weights)
        self.model_folder = folder
        self.architecture = loaded.architecture
        self.serving_path = loaded.serving_path
        if self.serving_path == "fallback":
            from truffula.models.hf_fallback import LIMITATIONS

            log.warning(
                "%s has no native implementation: served through transformers (%s)",
                loaded.architecture,
                LIMITATIONS,
            )
        self.tokenizer = Tokenizer(folder)
        self.table = TokenTable(self.tokenizer.hf)
        self.adapters = self._adapter_store(loaded.model)  # first: the KV cache takes what is left
        spec = config.scheduler.speculative  # a draft model too
        draft = Drafter.preload(spec, self.device, self.dtype, config.model.max_model_len)
        self.runner = self.ranks.runner(loaded, config, self.device, self.dtype, self.adapters)
        self.config = config = self.runner.config  # unset batching limits filled in by device
        self.sizing = self.runner.sizing
        self.max_len = self.runner.max_len
        self.vocab_size = self.runner.vocab_size
        self.pool = BlockPool(self.runner.num_blocks)
        self.prompts = PromptCache(
            self.pool,
            config.cache.block_size,
            f"{folder}|{self.architecture}|{self.dtype}|{self.serving_path}",
            self.adapters,
            config.limits.max_k_alternatives,
            config.cache.enable_prefix_caching,
        )
        self.runner.prompt_records_k = self.prompts.records_k
        self.runner.capture_graphs()
        log.info("sizing: %s", self.sizing.describe())
        assert config.scheduler.max_num_batched_tokens is not None  # set by for_device
        assert config.scheduler.max_num_seqs is not None
        self.scheduler = Scheduler(
            self.pool,
            config.cache.block_size,
            config.scheduler.max_num_batched_tokens,
            config.scheduler.max_num_seqs,
            admit=self._admit,
            release=self._release,
            max_prefill_while_decoding=config.scheduler.max_prefill_while_decoding or 0,
            prefix_cache=self.prompts.cache,
        )
        self.frontend = Frontend(
            self.tokenizer,
            config,
            self.max_len,
            self.vocab_size,
            self.serving_path,
            self.architecture,
            self.table,
        )
        self.requests: dict[str, Request] = {}
        self.metrics: MetricsSink | None = None
        mode = config.scheduler.async_scheduling
        self.overlap = self.serving_path != "fallback" and (
            mode == "on" or (mode == "auto" and self.device.type == "cuda")
        )
        self.drafter = None
        if spec is not None:  # verification waits for each step
            self.drafter, self.overlap = Drafter(spec, self.max_len, self.runner, draft), False
        self.inflight: InFlight | None = None
        self.isolation = StepIsolation(FaultInjector.from_env())
        keep_host_memory()
        dtype = str(self.dtype).removeprefix("torch.")
        log.info(
            "engine ready: %s (%s) on %s/%s, %d KV blocks of %d tokens, max length %d",
            *(folder, self.architecture, self.device, dtype, self.pool.capacity),
            *(config.cache.block_size, self.max_len),
        )

    # ---------------------------------------------------------------- adapters
    def _adapter_store(self, model: torch.nn.Module) -> AdapterStore:
        lora = self.config.lora
        layers = apply_lora(
            model, lora.max_active_adapters, lora.max_lora_rank, self.dtype, self.device
        )
        packed = getattr(model, "packed_modules", {})
        return AdapterStore(
            layers,
            packed,
            lora.max_active_adapters,
            lora.max_lora_rank,
            lora.adapter_root,
            max_cpu_adapters=lora.max_cpu_adapters,
            max_merged_adapters=lora.max_merged_adapters,
        )

    def _admit(self, seq: SeqState) -> int | None:
        """Scheduler hook: a request runs only once its adapter holds a device slot (returned;
        -1: the base model)."""
        slot: int | None = -1
        if seq.adapter is not None and (slot := self.adapters.acquire(seq.adapter)) is None:
            return None
        req = self.requests.get(seq.request_id)
        if req is not None and req.scheduled_at is None:
            req.scheduled_at = time.monotonic()  # the end of its queue span
        return slot

    def _release(self, seq: SeqState) -> None:
        """Scheduler hook: the request gave its adapter's slot back."""
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)

    # ---------------------------------------------------------------- requests
    def add(self, req: EngineRequest) -> None:
        """Make the record of a prepared request (``Frontend.prepare``) and queue it."""
        if self.scheduler.num_requests >= self.config.scheduler.max_queued_requests:
            raise EngineOverloadedError("Model is overloaded")
        if req.request_id in self.requests:
            raise RequestValidationError(
                "request_id", f"request id {req.request_id!r} is already in use"
            )
        params = req.params
        if params.adapter_id is not None:
            # servers load off the step loop first; this reads it again only if it was unloaded
            # since, and holds it at once (any spelling: the request keeps the key)
            key = self.adapters.add_user(params.adapter_id)
            if key != params.adapter_id:
                params = req.params = params.with_updates(adapter_id=key)
        try:
            sampling = SamplingState.create(
                params, req.prompt_ids, self.device, self.frontend.grammars
            )
        except Exception:
            if params.adapter_id is not None:
                self.adapters.remove_user(params.adapter_id)
            raise
        seq = self.prompts.new_seq(req.request_id, req.prompt_ids, params, sampling)
        self.requests[req.request_id] = Request(req, seq, sampling)
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort") -> EngineOutput | None:
        """Let a request go (client gone, or ``stop_sequence`` found by the frontend)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, reason)
        self.frontend.forget(request_id)
        return EngineOutput(request_id, finish_reason=reason, num_prompt_tokens=len(req.prompt_ids))

    # ---------------------------------------------------------------- in-process use
    def tokenize_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return self.frontend.tokenize_prompt(prompt, params)

    def prepare_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> EngineRequest:
        return self.frontend.prepare(prompt, params, request_id)

    def enqueue(self, req: EngineRequest) -> None:
        self.add(req)
        self.frontend.begin(req)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        req = self.prepare_request(prompt, params, request_id)
        self.enqueue(req)
        return req.request_id

    def step(self) -> list[RequestOutput]:
        """One step with the frontend in this process: text, records and stop strings."""
        outputs = []
        for raw in self.step_outputs():
            out, stopped = self.frontend.process(raw)
            if stopped:
                self.abort(raw.request_id, "stop_sequence")
            if out is not None:
                outputs.append(out)
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None

    # ---------------------------------------------------------------- one step
    def step_outputs(self) -> list[EngineOutput]:
        """One step; one that raises fails only its culprit (``truffula.engine.isolation``)."""
        try:
            return self._step_outputs()
        except Exception as exc:
            return self.isolation.recover(self, exc)

    def _step_outputs(self) -> list[EngineOutput]:
        """Schedule and launch a step, and return the outputs of the step before it.

        With asynchronous scheduling the step launched here stays in flight: its tokens are
        ``PLACEHOLDER``s that the next step reads on the device, and its results are read by the
        next call, while that call's step runs. A request that finishes (EOS, stop sequence)
        computes one token past its end, which is dropped. Without it, the step launched here
        is read before returning."""
        prev, self.inflight = self.inflight, None
        source = prev.launched if prev is not None else None  # where placeholders are read
        if self.drafter is not None:
            self.scheduler.set_drafts(self.drafter.draft(self.requests.values()))
        sched = self.scheduler.schedule()
        self.isolation.scheduled(self, sched)  # while isolating a failure: the suspects only
        self.prompts.take_records(sched, self.requests, self.scheduler)
        outputs = self.isolation.start(prev).outputs
        history = prev is not None and self._needs_history(sched)  # sampled after prev is read
        defer = history and self.overlap and not self.isolation.active
        if prev is not None and (sched.is_empty or (history and not defer)):
            outputs += self._process(prev)
            sched.seqs = [s for s in sched.seqs if s.request_id in self.requests]
            prev = None
        launched = self.isolation.launch(self.runner, sched, source, defer)
        current = None
        if not sched.is_empty:
            self.scheduler.step_done(sched)
            current = InFlight(launched, self._mark_in_flight(launched))
        if prev is not None:
            outputs += self._process(prev)
        self.isolation.sample(self.runner, launched)  # deferred: now that prev's tokens are read
        if current is not None:
            if self.overlap and not self.isolation.active:
                self.inflight = current
            else:
                outputs += self._process(current)
        self.isolation.done()
        return outputs

    def _needs_history(self, sched: SchedulerOutput) -> bool:
        """Penalties count every output token, and a constrained request's mask follows its
        last token: overlapping, such a step's forward pass is issued first and its rows are
        sampled once the step before it is read; else it waits for that step."""
        reqs = (self.requests.get(s.request_id) for s in sched.seqs if s.sample)
        return any(
            r is not None and (r.params.needs_penalties or r.params.constrained) for r in reqs
        )

    def _mark_in_flight(self, launched: Launched) -> dict[str, int | None]:
        """Give each sampling request a ``PLACEHOLDER`` for its coming token, unless that token
        is its last by length (then it is not scheduled again)."""
        placeholders: dict[str, int | None] = {}
        for i in dict.fromkeys(launched.sample_idx):  # a sequence with drafts has several rows
            req = self.requests.get(launched.sched.seqs[i].request_id)
            if req is None:
                continue
            generated = len(req.output_ids) + req.in_flight + 1
            req.in_flight += 1
            if generated >= req.max_new_tokens or len(req.prompt_ids) + generated >= self.max_len:
                placeholders[req.request_id] = None
                continue
            placeholders[req.request_id] = self.scheduler.add_placeholder(req.request_id)
        return placeholders

    def _process(self, inflight: InFlight) -> list[EngineOutput]:
        result = self.isolation.collect(self.runner, inflight)
        outputs = []
        for seq_out in result.seqs:
            req = self.requests.get(seq_out.request_id)
            if req is None:
                continue
            for i, rec in enumerate(seq_out.prompt_logprobs):
                req.prompt_records[seq_out.prompt_logprobs_start + i] = rec
            if seq_out.prompt_logprobs:
                self.prompts.keep_records(self.scheduler, req)
            if seq_out.sampled is not None and seq_out.request_id in inflight.placeholders:
                req.in_flight -= 1
                ph = inflight.placeholders[seq_out.request_id]
                out = self._on_token(req, seq_out, ph)
                if req.seq.drafts:
                    out = self._on_accepted(req, seq_out, out)
                outputs.append(out)
        return outputs

    def _on_accepted(self, req: Request, seq_out: SeqOutput, out: EngineOutput) -> EngineOutput:
        """The drafted tokens a step confirmed, and the sample after them, as one output."""
        assert self.drafter is not None
        self.drafter.verified(req.request_id, len(req.seq.drafts), len(seq_out.accepted))
        self.scheduler.accept_drafts(req.request_id, len(seq_out.accepted))
        records = seq_out.accepted_logprobs or [None] * len(seq_out.accepted)
        for tok, rec in zip(seq_out.accepted, records, strict=True):
            if out.finish_reason is not None:
                break
            more = self._on_token(req, SeqOutput(req.request_id, tok, rec), None)
            out.token_ids += more.token_ids
            out.logprobs += more.logprobs
            out.finish_reason = more.finish_reason
        return out

    def _on_token(self, req: Request, seq_out: SeqOutput, placeholder: int | None) -> EngineOutput:
        tok = seq_out.sampled
        assert tok is not None
        params = req.params
        req.sampling.accept(tok)  # the token history penalties count; the matcher advances
        self.scheduler.append_token(req.request_id, tok, placeholder)
        out = EngineOutput(
            req.request_id, [tok], [seq_out.logprobs], num_prompt_tokens=len(req.prompt_ids)
        )
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            out.timings = [req.scheduled_at or req.arrival, req.first_token_at]
            if params.wants_prompt_logprobs:
                k = params.prompt_k_alternatives
                out.prompt_logprobs = [
                    cut(req.prompt_records.get(pos), k) for pos in range(len(req.prompt_ids))
                ]
            req.prompt_records = {}
            self.scheduler.records_delivered(req.request_id)  # a recompute needs none
            if self.metrics is not None:
                self.metrics.first_token(req)
        reason = None
        if tok in self.tokenizer.eos_ids and not params.ignore_eos:
            reason = "eos_token"
        elif (
            len(req.output_ids) >= req.max_new_tokens
            or len(req.prompt_ids) + len(req.output_ids) >= self.max_len
        ):
            reason = "length"
        elif tok in params.extra_stop_token_ids:
            reason = "stop_sequence"
        if reason is not None:
            out.finish_reason = reason
            self._finish(req, reason)
            assert req.finished_at is not None  # set by _finish
            out.timings = [req.scheduled_at or req.arrival, req.first_token_at, req.finished_at]
        return out

    def _finish(self, req: Request, reason: str) -> None:
        """The one way out of the engine (finished, aborted, failed): the scheduler frees its
        blocks, prefix-cache references and adapter slot, the model drops its own caches of
        it, the adapter loses a user. A step still in flight may hold its sampling state: the
        token it computes is dropped."""
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        self.scheduler.finish(req.request_id)
        self.runner.release(req.request_id)
        if self.drafter is not None:
            self.drafter.release(req.request_id)
        self.requests.pop(req.request_id, None)
        if req.params.adapter_id is not None:
            self.adapters.remove_user(req.params.adapter_id)
        if self.metrics is not None:
            self.metrics.request_finished(req, reason)
