"""Tensor parallelism with asynchronous scheduling on (placeholders read from each rank's own
samples, penalised rows sampled after the step before is read), on a tiny Qwen3 (q/k norms,
tied embeddings): the same outputs as one process for greedy, penalised, structured and seeded
requests; a request whose sampling parameters break a step fails alone, the ranks staying in
step."""

from __future__ import annotations

import pytest

from distributed.tiny import PROMPTS, assert_same, engine, greedy, make_model
from truffula.engine.isolation import FaultInjector
from truffula.sampling.params import SamplingParams
from truffula.structured.spec import StructuredOutput

pytestmark = pytest.mark.slow  # spawns tensor-parallel ranks

SEED = 4242


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = make_model(
        tmp_path_factory.mktemp("tiny-qwen3"),
        "qwen3",
        head_dim=16,
        tie_word_embeddings=True,
    )
    one = engine(folder, 1, async_scheduling="on")
    two = engine(folder, 2, async_scheduling="on")
    assert two.engine.overlap
    yield one, two
    two.close()


def test_async_steps_match_one_process(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    params = [
        greedy(),
        greedy(repetition_penalty=1.3, frequency_penalty=0.2),
        greedy(structured=StructuredOutput("regex", "(one|two) (three|four)")),
        SamplingParams(
            max_new_tokens=6, temperature=0.8, top_k=20, seed=11, ignore_eos=True, details=True
        ),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    ref = one.generate(prompts, params)
    got = two.generate(prompts, params)
    for r, g in zip(ref, got, strict=True):
        assert_same(r, g)
    assert got[2].text in {f"{a} {b}" for a in ("one", "two") for b in ("three", "four")}


def test_a_failing_request_fails_alone(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    good = greedy()
    bad = SamplingParams(max_new_tokens=6, temperature=0.8, seed=SEED, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    params = [good, bad, good]
    results = []
    for llm in (one, two):
        llm.engine.isolation.faults = FaultInjector(SEED, 2)
        try:
            results.append(llm.generate(prompts, params))
        finally:
            llm.engine.isolation.faults = None
    ref, got = results
    assert got[1].finish_reason == "error" and ref[1].finish_reason == "error"
    for i in (0, 2):
        assert_same(ref[i], got[i])
    assert_same(one.generate(PROMPTS[:1], good)[0], two.generate(PROMPTS[:1], good)[0])
    assert not two.engine.requests and two.engine.pool.num_used == 0
