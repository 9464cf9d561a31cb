"""The default model (SmolLM2-135M: 9 heads, 3 KV heads, so 3 ranks) sharded over three gloo
ranks against one process, with peft adapters: identical greedy and seeded tokens, ranks and
alternative ids; logprobs within 1e-4. Entropies within 1e-3: one process sums ``p * x`` over the 49,152 logits
in float32 (about 1e-4 from the float64 value on logits of this size), the ranks' merge in
float64 from per-slice sums, closer to it."""

from __future__ import annotations

import pytest

from truffula.sampling.params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def pair(model_dir, peft_model):  # type: ignore[no-untyped-def]
    """One process and three ranks, serving the peft adapters of ``conftest.peft_model``."""
    from truffula.engine.llm import LLM

    def make(tp: int) -> LLM:
        return LLM(
            str(model_dir),
            progress=False,
            device="cpu",
            tensor_parallel_size=tp,
            adapter_root=str(peft_model.root),
            max_lora_rank=8,
        )

    one, three = make(1), make(3)
    yield one, three
    three.close()


def test_default_model_over_three_ranks(pair) -> None:  # type: ignore[no-untyped-def]
    one, three = pair
    greedy = SamplingParams(
        max_new_tokens=12, temperature=0, return_k_alternatives=5, prompt_k_alternatives=3
    )
    params = [
        greedy,
        SamplingParams(
            max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5, return_k_alternatives=2
        ),
        greedy.with_updates(adapter_id="all8"),  # every projection
        greedy.with_updates(adapter_id="mlp6rs"),  # gate, down, o (rsLoRA)
    ]
    prompts = PROMPTS + PROMPTS
    ref = one.generate(prompts, params)
    got = three.generate(prompts, params)
    assert ref[2].token_ids != ref[0].token_ids or ref[3].token_ids != ref[1].token_ids
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids and len(g.token_ids) == 12
        for a, b in zip(r.tokens, g.tokens, strict=True):
            assert a.rank == b.rank
            assert abs(a.logprob - b.logprob) <= 1e-4 and abs(a.entropy - b.entropy) <= 1e-3
            assert [x.id for x in a.alternatives] == [x.id for x in b.alternatives]
            for x, y in zip(a.alternatives, b.alternatives, strict=True):
                assert abs(x.logprob - y.logprob) <= 1e-4
        for a, b in zip(r.prompt_tokens or [], g.prompt_tokens or [], strict=True):
            assert a.id == b.id and a.rank == b.rank
            if a.logprob is not None:
                assert abs(a.logprob - b.logprob) <= 1e-4
