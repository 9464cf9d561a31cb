"""A tiny KV budget forces preemption and recompute; outputs equal those of a large budget."""

from __future__ import annotations

import pytest
from conftest import RAW_PROMPTS

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def tiny(model_dir):  # type: ignore[no-untyped-def]
    # 12 blocks of 4 tokens = 48 cached tokens for 5 requests that need ~25-35 each.
    return LLM(str(model_dir), progress=False, block_size=4, num_blocks=12, max_model_len=48)


def test_preemption_gives_the_same_outputs(tiny, llm) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(max_new_tokens=20, temperature=0, details=True, return_k_alternatives=3)
    seeded = SamplingParams(max_new_tokens=20, temperature=0.9, seed=7, details=True)
    params = [greedy, seeded, greedy, seeded, greedy]
    calls = {"n": 0}
    sched = tiny.engine.scheduler
    original = sched._preempt

    def counting(seq):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        original(seq)

    sched._preempt = counting
    try:
        small = tiny.generate(RAW_PROMPTS, params)
    finally:
        sched._preempt = original
    big = llm.generate(RAW_PROMPTS, params)
    assert calls["n"] > 0, "the budget was meant to force preemption"
    for a, b in zip(small, big, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
            if y.alternatives is not None:
                assert [t.id for t in x.alternatives] == [t.id for t in y.alternatives]
    assert tiny.engine.pool.num_used == 0


def test_prompt_logprobs_survive_preemption(tiny, llm) -> None:  # type: ignore[no-untyped-def]
    p = SamplingParams(
        max_new_tokens=16, temperature=0, decoder_input_details=True, prompt_k_alternatives=2
    )
    small = tiny.generate(RAW_PROMPTS, p)
    big = llm.generate(RAW_PROMPTS, p)
    for a, b in zip(small, big, strict=True):
        assert a.prompt_tokens is not None and b.prompt_tokens is not None
        assert [t.id for t in a.prompt_tokens] == [t.id for t in b.prompt_tokens]
        for x, y in zip(a.prompt_tokens[1:], b.prompt_tokens[1:], strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
