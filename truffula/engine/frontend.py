"""The API side of the engine: requests in as text, outputs out as text and token records.

``Frontend.prepare`` validates and tokenizes a request into an ``EngineRequest`` (touching no
engine state); ``Frontend.process`` turns the engine's numeric ``EngineOutput`` into a
``RequestOutput``: incremental detokenization, token records whose alternatives get their text
lazily, prompt records on the first output, and stop strings. A stop string ends the request
here; the caller tells the engine (``Abort(reason="stop_sequence")``). It runs in each API
process, next to the HTTP server, and inside ``LLMEngine`` for in-process use.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from truffula.config import EngineConfig
from truffula.engine.detokenizer import Detokenizer, TokenTable
from truffula.engine.messages import EngineOutput, EngineRequest
from truffula.engine.output import RequestOutput, TokenInfo, prompt_token_infos, token_info
from truffula.engine.tokenizer import Tokenizer
from truffula.errors import AdapterError, RequestValidationError
from truffula.runner.output import TokenLogprobs
from truffula.sampling.params import SamplingParams
from truffula.structured.compiler import GrammarCompiler


@dataclass(eq=False)
class _Tracked:
    request: EngineRequest
    detok: Detokenizer
    generated: int = 0
    first: bool = True
    prompt_records: list[TokenLogprobs | None] = field(default_factory=list)


class Frontend:
    def __init__(
        self,
        tokenizer: Tokenizer,
        config: EngineConfig,
        max_len: int,
        vocab_size: int,
        serving_path: str = "native",
        architecture: str = "",
        table: TokenTable | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.table = table or TokenTable(tokenizer.hf)
        self.config = config
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.serving_path = serving_path
        self.architecture = architecture
        self.tracked: dict[str, _Tracked] = {}
        self.grammars = GrammarCompiler(tokenizer.hf, vocab_size)
        """Structured-output grammars: checked here (API side), matchers made in the engine."""

    # ---------------------------------------------------------------- requests in
    def tokenize_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestValidationError("inputs", "`inputs` cannot be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestValidationError(
                    "inputs",
                    f"token ids must be integers in [0, {self.vocab_size}). Given: {bad[0]!r}",
                )
        if not ids:
            raise RequestValidationError("inputs", "`inputs` cannot be empty")
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        if len(ids) >= self.max_len:
            raise RequestValidationError(
                "inputs",
                f"`inputs` must have less than {self.max_len} tokens (the model's maximum length); "
                f"set `truncate` to keep the last tokens. Given: {len(ids)}",
            )
        return ids

    def prepare(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> EngineRequest:
        """Validate and tokenize; touches no engine state, so any thread may call it."""
        params.validate(self.config.limits)
        if params.adapter_id is not None and self.serving_path == "fallback":
            raise AdapterError(
                f"adapters are not supported for {self.architecture} (transformers fallback)", 422
            )
        if params.structured is not None:
            self.grammars.check_with_timeout(params.structured)
        ids = self.tokenize_prompt(prompt, params)
        room = self.max_len - len(ids)
        if params.max_new_tokens is None:
            max_new = min(self.config.limits.max_new_tokens_default, room)
        elif params.max_new_tokens > room:
            raise RequestValidationError(
                "max_new_tokens",
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_len}. "
                f"Given: {len(ids)} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`",
            )
        else:
            max_new = params.max_new_tokens
        return EngineRequest(request_id or uuid.uuid4().hex, ids, params, max_new)

    def begin(self, req: EngineRequest) -> None:
        """Start following a request's outputs (call before the engine may answer it)."""
        p = req.params
        self.tracked[req.request_id] = _Tracked(
            req, Detokenizer(self.table, p.stop, p.skip_special_tokens)
        )

    def forget(self, request_id: str) -> None:
        self.tracked.pop(request_id, None)

    # ---------------------------------------------------------------- outputs out
    def process(self, out: EngineOutput) -> tuple[RequestOutput | None, bool]:
        """The ``RequestOutput`` of one engine output (None for a request not followed), and
        whether a stop string ended it here (the engine must then be told)."""
        tr = self.tracked.get(out.request_id)
        if tr is None:
            return None, False
        req, params = tr.request, tr.request.params
        res = RequestOutput(out.request_id, seed=params.seed, timings=out.timings)
        res.num_prompt_tokens = len(req.prompt_ids)
        if out.prompt_logprobs is not None:
            tr.prompt_records = out.prompt_logprobs
        stopped = False
        for tok, lp in zip(out.token_ids, out.logprobs or [None] * len(out.token_ids), strict=True):
            pending = tr.detok.pending
            step = tr.detok.add(tok)
            res.tokens.append(
                token_info(
                    self.table,
                    tr.detok,
                    tok,
                    step.token_text,
                    lp,
                    pending,
                    params.return_k_alternatives,
                )
            )
            res.text += step.released
            tr.generated += 1
            if step.stopped:
                stopped = True
                break
        if tr.first and res.tokens:
            tr.first = False
            if params.wants_prompt_logprobs:
                res.prompt_tokens = self._prompt_tokens(tr)
        res.num_generated_tokens = tr.generated
        reason = "stop_sequence" if stopped else out.finish_reason
        if out.error is not None:  # the engine failed this request alone
            res.finished, res.finish_reason = True, "error"
            self.forget(out.request_id)
            return res, False
        if reason is not None:
            res.text += tr.detok.flush()
            res.finished, res.finish_reason = True, reason
            res.generated_text = tr.detok.text
            self.forget(out.request_id)
        return res, stopped and out.finish_reason is None

    def _prompt_tokens(self, tr: _Tracked) -> list[TokenInfo]:
        records = {pos: r for pos, r in enumerate(tr.prompt_records) if r is not None}
        return prompt_token_infos(
            self.table, tr.request.prompt_ids, records, tr.request.params.prompt_k_alternatives
        )
