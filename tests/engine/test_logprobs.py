"""Token probabilities on the default model, against references computed here with HF
transformers on the same token sequences (teacher forcing), in fp32."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from helpers import hf_logsoftmax

from truffula.sampling.params import SamplingParams

TOL = 1e-4


def assert_topk_equal(ids: list[int], lps: list[float], ref_row: torch.Tensor, k: int) -> None:
    """Same values as HF's top-k; ids equal except where HF itself has a tie."""
    ref_vals, ref_ids = ref_row.topk(k)
    assert len(ids) == len(lps) == k
    for j in range(k):
        assert abs(lps[j] - ref_vals[j].item()) <= TOL
        if ids[j] != ref_ids[j].item():
            assert abs(ref_row[ids[j]].item() - ref_vals[j].item()) <= TOL  # a tie
    assert lps == sorted(lps, reverse=True)


def entropy(row: torch.Tensor) -> float:
    p = row.exp()
    return float(-(torch.where(p > 0, p * row, torch.zeros_like(row))).sum())


def check_generated(llm, out, ref: torch.Tensor, k: int) -> None:  # type: ignore[no-untyped-def]
    """ref: log-softmax rows of the reported distribution at each generated position."""
    for i, t in enumerate(out.tokens):
        row = ref[i]
        assert abs(t.logprob - row[t.id].item()) <= TOL
        assert t.rank == int((row > row[t.id]).sum()) + 1
        assert abs(t.entropy - entropy(row)) <= 1e-3
        if k:
            finite = int(torch.isfinite(row).sum())
            kk = min(k, finite)
            assert_topk_equal(
                [a.id for a in t.alternatives], [a.logprob for a in t.alternatives], row, kk
            )
            assert sum(math.exp(a.logprob) for a in t.alternatives) <= 1 + 1e-5
            for a in t.alternatives:
                if a.id == t.id:
                    assert a.logprob == t.logprob
        assert math.isfinite(t.logprob) and math.isfinite(t.entropy)


@pytest.fixture(scope="module")
def prompt(llm) -> str:  # type: ignore[no-untyped-def]
    return llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a rainy day in two sentences."}]
    )


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_greedy_logprobs_ranks_entropy_alternatives(llm, hf_model, prompt, mode) -> None:  # type: ignore[no-untyped-def]
    k = 20
    p = SamplingParams(
        max_new_tokens=12, temperature=0, return_k_alternatives=k, logprobs_mode=mode
    )
    (out,) = llm.generate([prompt], p)
    ids = out.prompt_token_ids + out.token_ids
    ref = hf_logsoftmax(hf_model, ids)[len(out.prompt_token_ids) - 1 : -1]
    check_generated(llm, out, ref, k)
    for t in out.tokens:  # greedy: chosen is rank 1 and alternative[0] in either mode
        assert t.rank == 1 and t.alternatives[0].id == t.id


def hf_processed(
    hf_model, ids: list[int], start: int, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, start - 1 : -1].float()
    dummy = torch.zeros(1, 1, dtype=torch.long)
    rows = []
    for row in logits:
        x = TemperatureLogitsWarper(temperature)(dummy, row[None])
        x = TopKLogitsWarper(top_k)(dummy, x)
        x = TopPLogitsWarper(top_p)(dummy, x)
        rows.append(x[0].log_softmax(-1))
    return torch.stack(rows)


def test_seeded_sampling_processed_distribution(llm, hf_model, prompt) -> None:  # type: ignore[no-untyped-def]
    k = 20
    p = SamplingParams(
        max_new_tokens=12, temperature=0.7, top_k=10, top_p=0.9, seed=11, return_k_alternatives=k
    )
    (out,) = llm.generate([prompt], p)
    start = len(out.prompt_token_ids)
    ref = hf_processed(hf_model, out.prompt_token_ids + out.token_ids, start, 0.7, 10, 0.9)
    check_generated(llm, out, ref, k)
    for t in out.tokens:  # filtered tokens are never listed: at most top_k alternatives
        assert len(t.alternatives) <= 10
        assert t.id in [a.id for a in t.alternatives]


def test_seeded_sampling_raw_distribution(llm, hf_model, prompt) -> None:  # type: ignore[no-untyped-def]
    p = SamplingParams(
        max_new_tokens=12,
        temperature=1.3,
        top_p=0.8,
        seed=5,
        return_k_alternatives=5,
        logprobs_mode="raw",
    )
    (out,) = llm.generate([prompt], p)
    ids = out.prompt_token_ids + out.token_ids
    ref = hf_logsoftmax(hf_model, ids)[len(out.prompt_token_ids) - 1 : -1]
    check_generated(llm, out, ref, 5)
    (again,) = llm.generate([prompt], p.with_updates(logprobs_mode="processed"))
    assert (
        again.token_ids == out.token_ids
    )  # the mode changes what is reported, not what is sampled


def test_prompt_logprobs_and_prompt_alternatives(llm, hf_model) -> None:  # type: ignore[no-untyped-def]
    text = (
        "The Eiffel Tower is located in Paris, the capital of France, and it was completed in 1889."
    )
    p = SamplingParams(
        max_new_tokens=1, temperature=0, decoder_input_details=True, prompt_k_alternatives=5
    )
    (out,) = llm.generate([text], p)
    ids = out.prompt_token_ids
    ref = hf_logsoftmax(hf_model, ids)
    pts = out.prompt_tokens
    assert [t.id for t in pts] == ids
    assert pts[0].logprob is None and pts[0].alternatives is None
    for pos in range(1, len(ids)):
        row = ref[pos - 1]
        t = pts[pos]
        assert abs(t.logprob - row[ids[pos]].item()) <= TOL
        assert t.rank == int((row > row[ids[pos]]).sum()) + 1
        assert_topk_equal(
            [a.id for a in t.alternatives], [a.logprob for a in t.alternatives], row, 5
        )
    assert "".join(t.text for t in pts) == text


def test_prompt_logprobs_are_chunked_and_budget_independent(model_dir, llm) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    text = "A long prompt. " * 40
    small = LLM(str(model_dir), progress=False, max_num_batched_tokens=37, prompt_logprobs_chunk=16)
    p = SamplingParams(
        max_new_tokens=2, temperature=0, decoder_input_details=True, prompt_k_alternatives=3
    )
    (a,) = small.generate([text], p)
    (b,) = llm.generate([text], p)
    assert len(a.prompt_tokens) == len(b.prompt_tokens) > 100
    for x, y in zip(a.prompt_tokens[1:], b.prompt_tokens[1:], strict=True):
        assert abs(x.logprob - y.logprob) <= TOL and x.rank == y.rank
        assert [q.id for q in x.alternatives] == [q.id for q in y.alternatives]


def test_mixed_batch_equals_each_request_alone(llm) -> None:  # type: ignore[no-untyped-def]
    prompts = [
        "Tell me about cats.",
        "def add(a, b):",
        "The moon is",
        "Hello! How are you?",
        "Name three rivers.",
        "1, 2, 3,",
        "Why is the sky blue?",
        "Once upon a time",
    ]
    params = [
        SamplingParams(max_new_tokens=10, temperature=0, return_k_alternatives=0, details=True),
        SamplingParams(max_new_tokens=10, temperature=0, return_k_alternatives=1),
        SamplingParams(
            max_new_tokens=10, temperature=0, return_k_alternatives=5, logprobs_mode="raw"
        ),
        SamplingParams(max_new_tokens=10, temperature=0, return_k_alternatives=20),
        SamplingParams(
            max_new_tokens=10,
            temperature=0.8,
            seed=3,
            return_k_alternatives=20,
            logprobs_mode="raw",
        ),
        SamplingParams(
            max_new_tokens=10, temperature=0.8, seed=4, top_k=8, return_k_alternatives=20
        ),
        SamplingParams(max_new_tokens=10, temperature=0),
        SamplingParams(
            max_new_tokens=10, temperature=0, decoder_input_details=True, prompt_k_alternatives=2
        ),
    ]
    batch = llm.generate(prompts, params)
    for prompt, p, got in zip(prompts, params, batch, strict=True):
        (alone,) = llm.generate([prompt], p)
        assert got.token_ids == alone.token_ids
        for x, y in zip(got.tokens, alone.tokens, strict=True):
            if p.wants_logprobs:
                assert abs(x.logprob - y.logprob) <= TOL and x.rank == y.rank
                assert abs(x.entropy - y.entropy) <= 1e-3
            else:
                assert x.logprob is None and y.logprob is None
            if p.return_k_alternatives:
                assert [a.id for a in x.alternatives] == [a.id for a in y.alternatives]
                assert len(x.alternatives) <= p.return_k_alternatives
            else:
                assert x.alternatives is None


def test_logprobs_with_stop_sequence_report_generated_tokens(llm) -> None:  # type: ignore[no-untyped-def]
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    (full,) = llm.generate(
        [prompt], SamplingParams(max_new_tokens=20, temperature=0, return_k_alternatives=3)
    )
    (cut,) = llm.generate(
        [prompt],
        SamplingParams(max_new_tokens=20, temperature=0, return_k_alternatives=3, stop=("Paris",)),
    )
    n = len(cut.tokens)
    assert cut.finish_reason == "stop_sequence" and "Paris" not in cut.text
    assert cut.token_ids == full.token_ids[:n]
    assert "Paris" in "".join(
        t.text for t in cut.tokens
    )  # the token completing the stop is reported
    for x, y in zip(cut.tokens, full.tokens, strict=False):
        assert x.logprob == y.logprob and [a.id for a in x.alternatives] == [
            a.id for a in y.alternatives
        ]


def test_streaming_outputs_carry_their_own_alternatives(llm, prompt) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.async_engine import AsyncEngine

    p = SamplingParams(max_new_tokens=10, temperature=0, return_k_alternatives=4)
    (ref,) = llm.generate([prompt], p)

    async def run():  # type: ignore[no-untyped-def]
        engine = AsyncEngine(llm.engine)
        outs = [o async for o in engine.generate(prompt, p)]
        await engine.shutdown()
        return outs

    outs = asyncio.run(run())
    assert all(len(o.tokens) == 1 for o in outs)
    for o, t in zip(outs, ref.tokens, strict=True):
        got = o.tokens[0]
        assert got.id == t.id and [a.id for a in got.alternatives] == [a.id for a in t.alternatives]
    assert "".join(o.text for o in outs) == ref.text
