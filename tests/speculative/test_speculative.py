"""Speculative decoding (prompt lookup) against plain decoding with the default model: the same
tokens, logprobs, ranks and alternatives, only fewer steps."""

from __future__ import annotations

import pytest

from truffula.sampling.params import SamplingParams
from truffula.speculative import ngram
from truffula.speculative.config import SpeculativeConfig
from truffula.speculative.verify import accepted

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long "
    "discussion, the members agreed to fund the children's reading room and the new roof."
)


def test_prompt_lookup_proposes_what_followed_the_latest_match() -> None:
    h = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3]
    assert ngram.propose(h, 2, 1, 3) == [5, 6]  # the latest earlier [1, 2, 3] was followed by 5
    assert ngram.propose(h, 9, 1, 3) == [5, 6, 1, 2, 3]
    assert ngram.propose([7, 8, 9], 4, 1, 3) == []  # nothing recurs
    assert ngram.propose([5, 5], 3, 1, 1) == [5]  # the tail itself is not a match
    assert ngram.propose(h, 2, 4, 4) == []  # [9? , 1, 2, 3]: no earlier 4-gram equals the tail
    assert ngram.propose(h, 0, 1, 3) == []
    grown = ngram.History()  # the array a request's history keeps, grown step by step
    for n in (3, 8, 300, len(h) * 30):
        tokens = (h * 30)[:n]
        assert grown.sync(tokens).tolist() == tokens


def test_acceptance_is_the_prefix_the_samples_confirm() -> None:
    assert accepted([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accepted([5, 6, 7], [5, 9, 7, 8]) == 1
    assert accepted([5, 6, 7], [4, 6, 7, 8]) == 0
    with pytest.raises(ValueError):
        accepted([5], [5])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"num_speculative_tokens": 40}', "num_speculative_tokens"),
        ('{"num_speculative_tokens": 2, "lookahead": 1}', "lookahead"),
        ('{"num_speculative_tokens": 2, "method": "medusa"}', "method"),
        ('{"num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "min"),
        ("[1]", "object"),
        ("{", "JSON"),
    ],
)
def test_bad_speculative_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SpeculativeConfig.parse(text)


@pytest.fixture(scope="module")
def spec_llm(model_dir):  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    cfg = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    return LLM(str(model_dir), progress=False, speculative=cfg)


def copy_prompts(tok) -> list[str]:  # type: ignore[no-untyped-def]
    asks = [
        f"Repeat this text exactly, word for word:\n\n{TEXT}",
        f"Copy the following paragraph:\n\n{TEXT}\n\nCopy:",
        "Count from one to twenty in words: one, two, three, four, five,",
    ]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": a}], tokenize=False, add_generation_prompt=True
        )
        for a in asks
    ]


def test_greedy_speculation_changes_nothing_but_steps(llm, spec_llm, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    p = SamplingParams(
        max_new_tokens=48,
        temperature=0,
        return_k_alternatives=5,
        details=True,
        repetition_penalty=1.05,
    )
    prompts = copy_prompts(hf_tokenizer)
    plain, spec = llm.generate(prompts, p), spec_llm.generate(prompts, p)
    drafter = spec_llm.engine.drafter
    assert drafter.accepted > 20, (drafter.drafted, drafter.accepted)  # it sped something up
    for a, b in zip(plain, spec, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.text == a.text
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4 and x.rank == y.rank
            assert [t.id for t in x.alternatives] == [t.id for t in y.alternatives]
            for s, t in zip(x.alternatives, y.alternatives, strict=True):
                assert abs(s.logprob - t.logprob) < 1e-4


def test_stop_sequence_inside_an_accepted_run(llm, spec_llm, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    p = SamplingParams(max_new_tokens=48, temperature=0, stop=("reading room",), details=True)
    prompts = copy_prompts(hf_tokenizer)[:1]
    a, b = llm.generate(prompts, p)[0], spec_llm.generate(prompts, p)[0]
    assert b.text == a.text and b.finish_reason == a.finish_reason
    assert b.token_ids == a.token_ids


def test_sampled_tokens_carry_their_own_positions_statistics(llm, spec_llm, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Sampled (temperature 1, no filters: processed = the model's distribution): every emitted
    token's logprob and rank equal what a plain prefill of the same text gives at its position."""
    prompts = copy_prompts(hf_tokenizer)[:2]
    outs = spec_llm.generate(prompts, SamplingParams(max_new_tokens=32, seed=7, details=True))
    for out in outs:
        ref = llm.generate(
            [out.prompt_token_ids + out.token_ids],
            SamplingParams(max_new_tokens=1, decoder_input_details=True, temperature=0),
        )[0]
        n = len(out.prompt_token_ids)
        for i, tok in enumerate(out.tokens):
            want = ref.prompt_tokens[n + i]
            assert want.id == tok.id
            assert abs(want.logprob - tok.logprob) < 1e-4, i


def chi2_quantile(df: int, z: float = 3.09) -> float:
    """The chi-square distribution's quantile at the normal quantile ``z`` (3.09: 0.999),
    Wilson-Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * a**0.5) ** 3


def test_sampled_speculation_draws_from_the_target_distribution(
    llm, spec_llm, hf_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """400 seeded samples (temperature 1.5) of a copy prompt, whose second token is verified
    against a prompt-lookup draft: the joint frequencies of the first two tokens fit the model's
    own probabilities p(x1) p(x2 | x1) (chi-square at 0.999 over cells of at least 5 expected
    samples: likely pairs, the rest of each likely first token, everything else), and drafts
    were both accepted and rejected along the way. A verifier that kept drafts too readily
    would crowd the drafted pair's cell."""
    import math

    prompt = copy_prompts(hf_tokenizer)[0]
    n = 400
    temperature = 1.5  # drafts often rejected; processed logprobs report this distribution
    first = SamplingParams(max_new_tokens=1, temperature=temperature, return_k_alternatives=20)
    (head,) = llm.generate([prompt], first)
    ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expect: dict[tuple[int, int | None] | None, float] = {None: 1.0}
    for a in head.tokens[0].alternatives:
        pa = math.exp(a.logprob)
        if n * pa < 5:
            continue
        expect[None] -= pa
        expect[a.id, None] = pa  # x1 = a, x2 not among the likely pairs
        (nxt,) = llm.generate([[*ids, a.id]], first)
        for b in nxt.tokens[0].alternatives:
            pab = pa * math.exp(b.logprob)
            if n * pab >= 5:
                expect[a.id, b.id] = pab
                expect[a.id, None] -= pab
    for cell in [c for c, p in expect.items() if c is not None and n * p < 5]:
        expect[None] += expect.pop(cell)  # too few expected: pooled
    assert len(expect) >= 3 and n * expect[None] >= 5

    drafter = spec_llm.engine.drafter
    d0, a0 = drafter.drafted, drafter.accepted
    outs = spec_llm.generate(
        [prompt] * n,
        [SamplingParams(max_new_tokens=4, temperature=temperature, seed=s) for s in range(n)],
    )
    drafted, kept = drafter.drafted - d0, drafter.accepted - a0
    assert 0 < kept < drafted, (drafted, kept)  # both outcomes of verification happened
    counts = dict.fromkeys(expect, 0)
    for out in outs:
        x1, x2 = out.token_ids[:2]
        cell = (x1, x2) if (x1, x2) in expect else (x1, None)
        counts[cell if cell in expect else None] += 1
    stat = sum((counts[c] - n * p) ** 2 / (n * p) for c, p in expect.items())
    assert stat < chi2_quantile(len(expect) - 1), (stat, counts, expect)

    # after the likeliest first token a the drafts are (d1, d2): where the sample rejected d1,
    # the third token must follow the second one actually emitted, x3 ~ p(. | a, x2), and
    # equal d2 only as often as that says; a verifier that kept d1's continuation after
    # rejecting d1 would emit d2 there as often as p(d2 | a, d1)
    a = head.tokens[0].alternatives[0].id
    d1, d2 = ngram.propose([*ids, a], 2, 1, 3)
    rejected = [o.token_ids for o in outs if o.token_ids[0] == a and o.token_ids[1] != d1]
    assert len(rejected) >= 20
    seconds = sorted({t[1] for t in rejected})
    p_d2 = {}
    for b, out in zip(seconds, llm.generate([[*ids, a, b] for b in seconds], first), strict=True):
        top = {c.id: math.exp(c.logprob) for c in out.tokens[0].alternatives}
        p_d2[b] = top.get(d2, min(top.values()))  # outside the top 20: at most the 20th
    mean = sum(p_d2[t[1]] for t in rejected)
    var = sum(p_d2[t[1]] * (1 - p_d2[t[1]]) for t in rejected)
    seen = sum(t[2] == d2 for t in rejected)
    assert seen <= mean + 4 * var**0.5 + 2, (seen, mean, var, len(rejected))


def test_metrics_count_drafted_and_accepted_tokens(spec_llm) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.stats import EngineMetrics

    core = spec_llm.engine
    text = EngineMetrics(core).render()
    drafter = core.drafter
    assert drafter.drafted >= drafter.accepted > 0  # the tests above ran drafts
    assert (
        f'truffula_spec_decode_num_accepted_tokens_total{{method="ngram"}} {float(drafter.accepted)}'
        in text
    )
    assert 'truffula_spec_decode_acceptance_rate{method="ngram"}' in text


@pytest.fixture(scope="module")
def spec_server(model_dir):  # type: ignore[no-untyped-def]
    from serverproc import ServerProcess

    cfg = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    proc = ServerProcess("--speculative-config", cfg, "--max-k-alternatives", "20")
    yield proc
    proc.stop()


def test_over_http_streamed_and_whole_answers_equal_plain_serving(  # type: ignore[no-untyped-def]
    server, spec_server, hf_tokenizer
) -> None:
    import json

    import httpx

    prompt = copy_prompts(hf_tokenizer)[0]
    par = {"max_new_tokens": 40, "details": True, "return_k_alternatives": 3}
    body = {"inputs": prompt, "parameters": par}
    plain = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    spec = httpx.post(f"{spec_server.url}/generate", json=body, timeout=120).json()
    assert spec["generated_text"] == plain["generated_text"]
    for a, b in zip(plain["details"]["tokens"], spec["details"]["tokens"], strict=True):
        assert a["id"] == b["id"] and abs(a["logprob"] - b["logprob"]) < 1e-4
        assert [x["id"] for x in a["alternative_tokens"]] == [
            x["id"] for x in b["alternative_tokens"]
        ]
    streams = []
    for url in (server.url, spec_server.url):
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
            streams.append([json.loads(line[5:])["token"] for line in lines])
    assert [t["id"] for t in streams[0]] == [t["id"] for t in plain["details"]["tokens"]]
    assert [(t["id"], t["text"]) for t in streams[1]] == [(t["id"], t["text"]) for t in streams[0]]
    for a, b in zip(*streams, strict=True):
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
    metrics = httpx.get(f"{spec_server.url}/metrics", timeout=30).text
    line = next(
        x for x in metrics.splitlines() if x.startswith("truffula_spec_decode_num_accepted")
    )
    assert float(line.split()[-1]) > 0
    off = {"inputs": prompt, "parameters": {**par, "speculative": False}}
    again = httpx.post(f"{spec_server.url}/generate", json=off, timeout=120).json()
    assert again["generated_text"] == plain["generated_text"]
    bad = {"inputs": prompt, "parameters": {"speculative": "no"}}
    r = httpx.post(f"{spec_server.url}/generate", json=bad, timeout=30)
    assert r.status_code == 422 and "speculative" in r.text


def test_a_missed_draft_pauses_drafting_with_growing_waits() -> None:
    from dataclasses import dataclass, field

    from truffula.scheduler.scheduler import SeqState, SeqStatus
    from truffula.speculative.drafter import Drafter

    @dataclass
    class Req:
        seq: SeqState
        output_ids: list[int] = field(default_factory=list)
        max_new_tokens: int = 100
        speculative: bool = True

    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    seq = SeqState("r", tokens, 3, num_computed=len(tokens) - 1, status=SeqStatus.RUNNING)
    req = Req(seq)
    d = Drafter(SpeculativeConfig.parse('{"num_speculative_tokens": 2}'), max_len=1000)

    def drafts_over(steps: int) -> list[bool]:
        out = []
        for _ in range(steps):
            out.append(bool(d.draft([req]).get("r")))
        return out

    assert drafts_over(1) == [True]
    d.verified("r", 2, 0)  # a miss: skip one step
    assert drafts_over(2) == [False, True]
    d.verified("r", 2, 0)  # a second miss: skip two
    assert drafts_over(3) == [False, False, True]
    d.verified("r", 2, 1)  # a hit: every step again
    assert drafts_over(2) == [True, True]
    assert d.accepted == 1
    for _ in range(8):  # misses in a row: the pause stops growing at the method's longest
        d.verified("r", 2, 0)
        while not d.draft([req]).get("r"):
            pass
    d.verified("r", 2, 0)
    assert drafts_over(17) == [False] * 16 + [True]


def test_constrained_requests_on_a_speculating_engine(llm, spec_llm, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Structured output beside drafted rows: constrained requests are never drafted (a draft
    would need the grammar's mask at every drafted position), run in the same batches as
    drafted ones, and give the plain engine's tokens and logprobs with valid JSON; the free
    requests beside them are still drafted."""
    import json

    from truffula.structured.spec import StructuredOutput

    schema = {
        "type": "object",
        "properties": {"word": {"type": "string"}},
        "required": ["word"],
        "additionalProperties": False,
    }
    spec = StructuredOutput("json", json.dumps(schema))
    prompts = copy_prompts(hf_tokenizer)
    params = [
        SamplingParams(max_new_tokens=24, temperature=0, structured=spec, details=True),
        SamplingParams(max_new_tokens=32, temperature=0, details=True),
        SamplingParams(max_new_tokens=24, temperature=0.8, seed=3, structured=spec, details=True),
    ]
    drafter = spec_llm.engine.drafter
    d0 = drafter.drafted
    got, want = spec_llm.generate(prompts, params), llm.generate(prompts, params)
    assert drafter.drafted > d0  # the free request was drafted
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
    for out in (got[0], got[2]):
        if out.finish_reason != "length":
            assert set(json.loads(out.text)) == {"word"}
