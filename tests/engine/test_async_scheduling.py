"""Asynchronous scheduling (step N+1 launched before step N's results are read) gives exactly
the outputs of the synchronous engine: same tokens, text, logprobs, alternatives and finish
reasons, under preemption, at the length limit, with penalties and with aborts."""

from __future__ import annotations

import pytest
from conftest import RAW_PROMPTS

from truffula.engine.llm import LLM, Completion
from truffula.sampling.params import SamplingParams
from truffula.scheduler.output import PLACEHOLDER

MIXED = [
    SamplingParams(max_new_tokens=24, temperature=0, return_k_alternatives=5, ignore_eos=True),
    SamplingParams(max_new_tokens=40, temperature=0.9, seed=3, stop=("\n",), details=True),
    SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.3, frequency_penalty=0.4),
    SamplingParams(
        max_new_tokens=30,
        temperature=0.7,
        top_p=0.9,
        seed=11,
        decoder_input_details=True,
        prompt_k_alternatives=2,
        logprobs_mode="raw",
    ),
    SamplingParams(max_new_tokens=16, temperature=0, details=True),  # may stop at EOS
]


@pytest.fixture(scope="module")
def async_llm(model_dir):  # type: ignore[no-untyped-def]
    return LLM(str(model_dir), progress=False, max_k_alternatives=50, async_scheduling="on")


def same(a: Completion, b: Completion) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert (x.logprob is None) == (y.logprob is None)
        if y.logprob is not None:
            assert abs(x.logprob - y.logprob) < 1e-4 and x.rank == y.rank
        if y.alternatives is not None:
            assert [t.id for t in x.alternatives] == [t.id for t in y.alternatives]
    if b.prompt_tokens is not None:
        assert a.prompt_tokens is not None
        for x, y in zip(a.prompt_tokens[1:], b.prompt_tokens[1:], strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4


def test_async_engine_equals_the_synchronous_one(async_llm, llm) -> None:  # type: ignore[no-untyped-def]
    assert async_llm.engine.overlap and not llm.engine.overlap
    want = llm.generate(RAW_PROMPTS, MIXED)
    got = async_llm.generate(RAW_PROMPTS, MIXED)
    for a, b in zip(got, want, strict=True):
        same(a, b)
    assert {c.finish_reason for c in want} >= {"length", "stop_sequence"}
    engine = async_llm.engine
    assert not engine.has_work() and engine.inflight is None
    assert engine.pool.num_used == 0 and not engine.requests


def test_async_preemption_and_the_length_limit(model_dir, llm) -> None:  # type: ignore[no-untyped-def]
    # 12 blocks of 4 tokens for 5 requests that need ~25-35 each; max_new_tokens reaches the
    # model length exactly for one of them, so no token may be launched past it
    tiny = LLM(
        str(model_dir),
        progress=False,
        block_size=4,
        num_blocks=12,
        max_model_len=48,
        async_scheduling="on",
    )
    preempt = tiny.engine.scheduler._preempt
    calls = {"n": 0}

    def counting(seq):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        preempt(seq)

    tiny.engine.scheduler._preempt = counting  # type: ignore[method-assign]
    prompt_len = len(tiny.engine.tokenize_prompt(RAW_PROMPTS[0], SamplingParams()))
    params = [
        SamplingParams(max_new_tokens=48 - prompt_len, temperature=0, ignore_eos=True),
        *MIXED[1:],
    ]
    got = tiny.generate(RAW_PROMPTS, params)
    want = llm.generate(RAW_PROMPTS, params)
    assert calls["n"] > 0, "the budget was meant to force preemption"
    for a, b in zip(got, want, strict=True):
        same(a, b)
    assert len(got[0].token_ids) == 48 - prompt_len and got[0].finish_reason == "length"
    assert tiny.engine.pool.num_used == 0 and not tiny.engine.has_work()


def test_abort_while_a_step_is_in_flight(async_llm, llm) -> None:  # type: ignore[no-untyped-def]
    engine = async_llm.engine
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, details=True)
    keep = engine.add_request(RAW_PROMPTS[0], p)
    gone = engine.add_request(RAW_PROMPTS[1], p)
    tokens: list[int] = []
    for _ in range(4):
        for out in engine.step():
            if out.request_id == keep:
                tokens += [t.id for t in out.tokens]
    assert engine.inflight is not None
    seq = engine.requests[gone].seq
    assert seq.token_ids[-1] == PLACEHOLDER and seq.unresolved == 1
    assert engine.abort(gone) is not None
    while engine.has_work():
        for out in engine.step():
            assert out.request_id == keep
            tokens += [t.id for t in out.tokens]
    (want,) = llm.generate([RAW_PROMPTS[0]], p)
    assert tokens == want.token_ids
    assert engine.pool.num_used == 0 and not engine.requests


def test_constrained_and_penalised_rows_keep_the_overlap(async_llm, llm) -> None:  # type: ignore[no-untyped-def]
    """Steps with grammar-constrained or penalised rows issue their forward pass before the
    step before them is read and sample once it is (masks and penalties follow its tokens): the
    same outputs as the synchronous engine, JSON valid, and such steps never wait to launch."""
    import json

    from truffula.structured.spec import StructuredOutput

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    spec = StructuredOutput("json", json.dumps(schema))
    params = [
        SamplingParams(max_new_tokens=40, temperature=0, structured=spec, return_k_alternatives=3),
        SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=40, temperature=0.8, seed=5, structured=spec, details=True),
        SamplingParams(max_new_tokens=20, temperature=0, presence_penalty=0.8, details=True),
        SamplingParams(
            max_new_tokens=12, temperature=0, structured=StructuredOutput("regex", "[a-z]{3,8}")
        ),
    ]
    runner = async_llm.engine.runner
    launches: list[bool] = []
    launch = runner.launch

    def watched(sched, prev=None, defer_sampling=False):  # type: ignore[no-untyped-def]
        if not sched.is_empty:
            launches.append(defer_sampling)
        return launch(sched, prev, defer_sampling)

    runner.launch = watched
    try:
        got = async_llm.generate(RAW_PROMPTS, params)
    finally:
        del runner.launch
    want = llm.generate(RAW_PROMPTS, params)
    for a, b in zip(got, want, strict=True):
        same(a, b)
    for out in (got[0], got[2]):
        if out.finish_reason != "length":
            json.loads(out.text)
    assert sum(launches) >= 10, launches  # deferred samplers, the overlap kept
    engine = async_llm.engine
    assert not engine.has_work() and engine.inflight is None and not engine.requests
