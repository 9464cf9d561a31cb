"""Greedy generation equals HF transformers' generate, alone and in a mixed batch."""

from __future__ import annotations

import pytest
from conftest import RAW_PROMPTS
from helpers import assert_same_greedy, hf_greedy

from truffula.sampling.params import SamplingParams

N = 24


@pytest.fixture(scope="module")
def prompts(chat_prompts: list[str]) -> list[str]:
    return chat_prompts + RAW_PROMPTS


@pytest.fixture(scope="module")
def hf_refs(hf_model, llm, prompts):  # type: ignore[no-untyped-def]
    return [hf_greedy(hf_model, llm.tokenizer.encode(p), N) for p in prompts]


def test_greedy_alone_matches_hf(llm, prompts, hf_refs) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_new_tokens=N, temperature=0)
    for prompt, (ref, margins) in zip(prompts, hf_refs, strict=True):
        (out,) = llm.generate([prompt], params)
        assert_same_greedy(out.token_ids, ref, margins)


def test_greedy_batch_of_8_matches_hf(llm, prompts, hf_refs) -> None:  # type: ignore[no-untyped-def]
    assert len(prompts) == 8
    assert len({len(llm.tokenizer.encode(p)) for p in prompts}) > 4  # different lengths
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=N, temperature=0))
    for out, (ref, margins) in zip(outs, hf_refs, strict=True):
        assert_same_greedy(out.token_ids, ref, margins)
        assert out.finish_reason in ("length", "eos_token")


def test_text_equals_tokenizer_decode(llm, prompts) -> None:  # type: ignore[no-untyped-def]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=N, temperature=0))
    for out in outs:
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_chunked_prefill_matches_single_chunk(model_dir, llm, prompts) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    small = LLM(str(model_dir), progress=False, max_num_batched_tokens=7)
    params = SamplingParams(max_new_tokens=12, temperature=0, details=True)
    for a, b in zip(small.generate(prompts, params), llm.generate(prompts, params), strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
