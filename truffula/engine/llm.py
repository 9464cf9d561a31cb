"""``LLM``: the synchronous engine API for scripts and notebooks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from truffula.config import EngineConfig
from truffula.engine.core import EngineCore
from truffula.engine.output import RequestOutput, TokenInfo
from truffula.engine.tokenizer import Tokenizer
from truffula.sampling.params import SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_tokens: list[TokenInfo] | None = None
    finish_reason: str | None = None


class LLM:
    """Load a model once, then ``generate`` batches of prompts with continuous batching::

    llm = LLM()                      # the embedded default model
    out = llm.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0))
    """

    def __init__(self, model: str = "default", progress: bool = True, **options: object) -> None:
        self.engine = EngineCore(
            EngineConfig.from_kwargs(model=model, **options), progress=progress
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks, if any (also done at exit)."""
        self.engine.ranks.close()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        batch: Sequence[str | Sequence[int]] = [prompts] if isinstance(prompts, str) else prompts
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(batch)
        if len(params) != len(batch):
            raise ValueError("give one SamplingParams for all prompts or one per prompt")
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(batch, params, strict=True):
            rid = self.engine.add_request(prompt if isinstance(prompt, str) else list(prompt), p)
            results[rid] = Completion(rid, list(self.engine.requests[rid].prompt_ids))
            order.append(rid)
        pending = set(order)
        while pending:
            for out in self.engine.step():
                _merge(results[out.request_id], out)
                if out.finished:
                    pending.discard(out.request_id)
        return [results[rid] for rid in order]


def _merge(c: Completion, out: RequestOutput) -> None:
    c.text += out.text
    c.tokens += out.tokens
    c.token_ids += [t.id for t in out.tokens]
    if out.prompt_tokens is not None:
        c.prompt_tokens = out.prompt_tokens
    if out.finished:
        c.finish_reason = out.finish_reason
