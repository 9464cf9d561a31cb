"""The sampler: filters and penalties against HF transformers' processors, the sampling
distribution, seeds, and greedy rows in mixed batches."""

from __future__ import annotations

import pytest
import torch

from truffula.kernels.stats_torch import logprob_stats, stats_of_logits
from truffula.sampling.metadata import build_sampling_batch
from truffula.sampling.params import SamplingParams
from truffula.sampling.sampler import Sampler, apply_filters, apply_penalties

V = 200


def batch_for(params, prompts=None, outputs=None):  # type: ignore[no-untyped-def]
    n = len(params)
    return build_sampling_batch(
        params, prompts or [[1, 2]] * n, outputs or [[]] * n, [None] * n, V, torch.device("cpu")
    )


def hf_warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    x = logits.clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if p.temperature not in (0.0, 1.0):
        x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    if p.typical_p < 1:
        x = TypicalLogitsWarper(p.typical_p)(ids, x)
    return x


CASES = [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, typical_p=0.6),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.0, top_k=3),
]


def test_filters_match_hf_warpers_in_one_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), V, generator=gen) * 3
    b = batch_for(CASES)
    ours = apply_filters(logits / b.temperature.unsqueeze(1), b)
    for i, p in enumerate(CASES):
        ref = hf_warp(logits[i : i + 1], p.with_updates(temperature=p.temperature or 1.0))[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), p
        keep = ~torch.isinf(ref)
        assert torch.allclose(ours[i][keep], ref[keep], atol=1e-6)


def test_penalties_match_hf_repetition_and_openai_frequency_presence() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=gen)
    prompts = [[3, 4, 5], [7, 7, 8], [9]]
    outputs = [[5, 6, 6], [], [10, 10, 10, 11]]
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=0.8),
    ]
    b = batch_for(params, prompts, outputs)
    ours = apply_penalties(logits, b)
    ref0 = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor([prompts[0] + outputs[0]]), logits[:1].clone()
    )
    assert torch.allclose(ours[0], ref0[0])
    assert torch.equal(ours[1], logits[1])
    ref2 = RepetitionPenaltyLogitsProcessor(0.8)(
        torch.tensor([prompts[2] + outputs[2]]), logits[2:].clone()
    )[0]
    ref2[10] -= 0.5 * 3 + 0.25
    ref2[11] -= 0.5 * 1 + 0.25
    assert torch.allclose(ours[2], ref2, atol=1e-6)


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1] + [0.0] * (V - 4))
    n = 20000
    logits = probs.clamp_min(1e-30).log().expand(n, V).clone()
    torch.manual_seed(3)
    out = Sampler()(logits, batch_for([SamplingParams(temperature=1.0)] * n)).sampled
    freq = torch.bincount(out, minlength=V).float() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), freq[:5]


def test_greedy_rows_in_a_sampling_batch_take_the_argmax() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, V, generator=gen)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 3
    out = Sampler()(logits, batch_for(params)).sampled
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))
    assert torch.isfinite(logits).all()


def test_greedy_rows_with_alternatives_take_the_first_of_tied_maxima() -> None:
    """All-greedy batches with alternatives take the token from the top-k; where the two
    largest logits tie, the first index wins, as with argmax (and HF)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=gen)
    logits[1, 7] = logits[1, 150] = logits[1].max() + 1.0  # a tie at the top
    logits[2, 9] = logits[2, 3] = logits[2].max() + 1.0
    params = [SamplingParams(temperature=0.0, return_k_alternatives=3)] * 4
    out = Sampler()(logits, batch_for(params))
    assert torch.equal(out.sampled, logits.argmax(-1))
    assert out.sampled[1] == 7 and out.sampled[2] == 3
    assert out.logprobs is not None and torch.equal(out.logprobs.ranks, torch.ones(4).long())


def test_seeded_rows_draw_from_their_own_generator() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=gen)

    def run(rows: list[int], seed_row: int) -> int:
        params = [SamplingParams(temperature=1.0, seed=42 if i == seed_row else None) for i in rows]
        gens = [torch.Generator().manual_seed(42) if i == seed_row else None for i in rows]
        b = build_sampling_batch(
            params, [[1]] * len(rows), [[]] * len(rows), gens, V, torch.device("cpu")
        )
        return int(Sampler()(logits[rows], b).sampled[rows.index(seed_row)])

    alone = run([2], 2)
    assert all(run([0, 1, 2, 3], 2) == alone for _ in range(5))


@pytest.mark.slow
def test_engine_seed_is_reproducible_whatever_the_batch(llm) -> None:  # type: ignore[no-untyped-def]
    prompt = "Write a short poem about autumn leaves."
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    (alone,) = llm.generate([prompt], p)
    others = [SamplingParams(max_new_tokens=15, temperature=0.8, seed=s) for s in (1, 2)] + [
        SamplingParams(max_new_tokens=10, temperature=1.2),
        SamplingParams(max_new_tokens=12, temperature=0),
    ]
    outs = llm.generate(
        ["Hi", "Tell me a joke", prompt, "Count to five", "Why"],
        [others[0], others[1], p, others[2], others[3]],
    )
    assert outs[2].token_ids == alone.token_ids
    (again,) = llm.generate([prompt], p)
    assert again.token_ids == alone.token_ids
    (other_seed,) = llm.generate([prompt], p.with_updates(seed=99))
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.slow
def test_temperature_zero_is_greedy_in_any_batch(llm) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of Italy is"
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    (alone,) = llm.generate([prompt], greedy)
    mixed = llm.generate(
        [prompt, prompt, prompt],
        [
            greedy,
            SamplingParams(max_new_tokens=12, temperature=1.5, seed=3),
            SamplingParams(max_new_tokens=12, temperature=0.01, top_k=5),
        ],
    )
    assert mixed[0].token_ids == alone.token_ids
    assert mixed[2].token_ids == alone.token_ids  # near-zero temperature concentrates on the argmax


@pytest.mark.slow
def test_stop_sequences_max_tokens_eos_and_ignore_eos(llm) -> None:  # type: ignore[no-untyped-def]
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    (free,) = llm.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0))
    assert free.finish_reason == "eos_token" and free.token_ids[-1] in llm.tokenizer.eos_ids
    assert "Paris" in free.text
    (stopped,) = llm.generate(
        [prompt], SamplingParams(max_new_tokens=40, temperature=0, stop=("Paris",))
    )
    assert stopped.finish_reason == "stop_sequence"
    assert stopped.text == free.text[: free.text.index("Paris")]
    (short,) = llm.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0))
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    (forced,) = llm.generate(
        [prompt], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    )
    assert forced.finish_reason == "length" and len(forced.token_ids) == 30


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprob_stats_against_a_float64_reference(k: int) -> None:
    """Chosen tokens inside and outside the top k, rows with filtered (-inf) entries, and a row
    where fewer than k tokens survive: every statistic equals the direct float64 computation."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=gen) * 4
    logits[1, ::2] = float("-inf")  # half filtered out
    logits[2, 3:] = float("-inf")  # only three tokens left
    chosen = torch.tensor([int(logits[0].argmax()), 1, 0, 7, 150, int(logits[5].argmin())])
    lp = logits.log_softmax(-1)
    for ids, lps, ranks, entropy in (
        logprob_stats(lp, chosen, k),
        stats_of_logits(logits, chosen, k),  # the sampler's path from the logits
    ):
        check_stats(logits, chosen, k, ids, lps, ranks, entropy)


def check_stats(logits, chosen, k, ids, lps, ranks, entropy) -> None:  # type: ignore[no-untyped-def]
    ref = logits.double().log_softmax(-1)
    for r in range(len(chosen)):
        c = int(chosen[r])
        assert ids[r, 0] == c and abs(float(lps[r, 0]) - float(ref[r, c])) < 1e-5
        assert int(ranks[r]) == 1 + int((ref[r] > ref[r, c]).sum())
        finite = ref[r][torch.isfinite(ref[r])]
        assert abs(float(entropy[r]) + float((finite.exp() * finite).sum())) < 1e-4
        top = torch.topk(ref[r], k).values
        torch.testing.assert_close(lps[r, 1:].double(), top, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_two_stage_topk_equals_torch_topk(k: int) -> None:
    """The CPU top-k over chunk maxima gives torch.topk's values and (without ties) indices,
    for a vocabulary that is not a multiple of the chunk, with filtered (-inf) rows."""
    from truffula.kernels.stats_torch import topk_rows

    gen = torch.Generator().manual_seed(k)
    x = torch.randn(6, 49157, generator=gen) * 3
    x[1, ::2] = float("-inf")
    x[2, 10:] = float("-inf")  # fewer finite entries than k for k = 20
    x[3, -1] = 100.0  # the largest entry in the partial last chunk
    values, indices = topk_rows(x, k)
    want = torch.topk(x, k, dim=1)
    assert torch.equal(values, want.values)
    finite = torch.isfinite(want.values)
    assert torch.equal(indices[finite], want.indices[finite])
    assert torch.equal(x.gather(1, indices), values)
