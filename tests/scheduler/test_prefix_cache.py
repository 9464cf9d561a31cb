"""Automatic prefix caching: the block pool's evictable blocks, keys and exact hit checks, the
scheduler's admission from a cached prefix (plain data), and, on the default model, hits that
return the numbers of a cold prefill (generated and prompt records), base vs adapters."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams
from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.output import PLACEHOLDER
from truffula.scheduler.prefix_cache import PrefixCache, block_key
from truffula.scheduler.scheduler import Scheduler, SeqState

BS = 4


def _sched(num_blocks: int = 32, **kw: object) -> tuple[Scheduler, PrefixCache]:
    pool = BlockPool(num_blocks)
    cache = PrefixCache(pool, BS, "model", **kw)  # type: ignore[arg-type]
    return Scheduler(pool, BS, 64, 8, prefix_cache=cache), cache


def _run(s: Scheduler, seq: SeqState) -> None:
    """Admit and prefill one sequence to its end (no sampling: plain data)."""
    s.add(seq)
    while seq.num_computed < len(seq.token_ids):
        s.step_done(s.schedule())


# ---------------------------------------------------------------- block pool
def test_released_cached_blocks_wait_lru_and_are_evicted_last_released_last() -> None:
    pool = BlockPool(4)  # blocks 1..3
    evicted: list[int] = []
    pool.on_evict = evicted.append
    a, b, c = pool.allocate(3)
    pool.mark_cached(a)
    pool.mark_cached(b)
    pool.free([b, a, c])
    assert pool.num_free == 3 and pool.num_evictable == 2 and pool.num_used == 0
    pool.share([a])  # a hit takes it back out of the LRU list
    assert pool.ref_count(a) == 1 and pool.num_evictable == 1
    assert pool.allocate(1) == [c]  # plain free blocks go first
    assert pool.allocate(1) == [b] and evicted == [b]
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free([c])
    with pytest.raises(ValueError):
        pool.free([c])
    with pytest.raises(ValueError):
        pool.share([c])  # free and not cached: no one can share it


def test_block_key_is_128_bit_and_covers_parent_salt_and_tokens() -> None:
    k = block_key(b"", b"m", b"", [1, 2, 3, 4])
    assert len(k) == 16
    assert k != block_key(k, b"m", b"", [1, 2, 3, 4])
    assert k != block_key(b"", b"m", b"lora#1", [1, 2, 3, 4])
    assert k != block_key(b"", b"m2", b"", [1, 2, 3, 4])
    assert k != block_key(b"", b"m", b"", [1, 2, 3, 5])


# ---------------------------------------------------------------- scheduler with a cache
def test_a_long_prompt_registers_its_blocks_chunk_by_chunk() -> None:
    pool = BlockPool(64)
    cache = PrefixCache(pool, BS, "model")
    s = Scheduler(pool, BS, 16, 8, prefix_cache=cache)  # 16-token chunks of a 50-token prompt
    _run(s, SeqState("a", list(range(50)), 50))
    assert cache.num_cached_blocks == 12
    seq = SeqState("b", list(range(50)), 50)
    s.add(seq)
    s.schedule()
    assert seq.num_cached_tokens == 48


def test_a_repeated_prompt_starts_from_its_cached_blocks_and_computes_one_token() -> None:
    s, cache = _sched()
    first = SeqState("a", list(range(100, 112)), 12)
    _run(s, first)
    assert cache.num_cached_blocks == 3
    s.finish("a")
    again = SeqState("b", list(range(100, 112)), 12)
    s.add(again)
    out = s.schedule()
    # 12 tokens = 3 full blocks, but one token is always computed: 2 blocks are hit
    assert again.num_cached_tokens == 8 and out.seqs[0].start_pos == 8
    assert cache.hits == 8 and cache.queries == 24
    s.step_done(out)
    s.finish("b")
    assert s.pool.num_used == 0


def test_blocks_are_shared_by_reference_and_never_written_by_the_sharer() -> None:
    s, _ = _sched()
    a = SeqState("a", list(range(10)), 10)
    _run(s, a)
    b = SeqState("b", [*range(9), 99, 98, 97], 12)
    s.add(b)
    out = s.schedule()
    seq_b = next(x for x in out.seqs if x.request_id == "b")
    assert seq_b.start_pos == 8 and seq_b.block_ids[:2] == a.block_ids[:2]
    assert s.pool.ref_count(a.block_ids[0]) == 2
    # the sharer writes from position 8 on: its third block is its own
    assert seq_b.block_ids[2] not in a.block_ids


def test_adapters_and_base_never_share_blocks() -> None:
    s, _ = _sched()
    _run(s, SeqState("a", list(range(12)), 12, cache_salt=b"A#1"))
    for rid, salt in (("base", b""), ("b", b"B#2"), ("a2", b"A#3")):
        seq = SeqState(rid, list(range(12)), 12, cache_salt=salt)
        s.add(seq)
        s.step_done(s.schedule())
        assert seq.num_cached_tokens == 0, rid
    seq = SeqState("a3", list(range(12)), 12, cache_salt=b"A#1")
    s.add(seq)
    s.schedule()
    assert seq.num_cached_tokens == 8


def test_a_hash_collision_cannot_serve_wrong_blocks() -> None:
    """With a hash that maps everything to one key, every hit is still checked exactly."""
    s, cache = _sched(hash_fn=lambda parent, model, salt, tokens: b"same")
    _run(s, SeqState("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 9))
    assert cache.num_cached_blocks == 1  # the second block collides and stays out
    for rid, toks in (
        ("other", [9, 9, 9, 9, 5, 6, 7, 8, 1]),
        ("shifted", [1, 2, 3, 4, 1, 2, 3, 4, 1]),
    ):
        seq = SeqState(rid, toks, 9)
        s.add(seq)
        s.step_done(s.schedule())
        hit = seq.num_cached_tokens
        assert hit == (4 if toks[:4] == [1, 2, 3, 4] else 0), rid
        # the colliding second block [1, 2, 3, 4] of "shifted" never matched block 0's entry
        assert hit <= 4


def test_blocks_with_unknown_tokens_are_not_registered() -> None:
    s, cache = _sched()
    seq = SeqState("a", [1, 2, 3, 4, 5, 6, 7, PLACEHOLDER], 7)
    s.add(seq)
    out = s.schedule()
    s.step_done(out)
    assert cache.num_cached_blocks == 1  # the block holding the placeholder waits
    seq.token_ids[-1] = 8
    seq.unresolved = 0
    s.finish("a")  # resolved by then: registered on the way out
    assert cache.num_cached_blocks == 2


def test_eviction_takes_the_tail_of_released_sequences_first() -> None:
    s, cache = _sched(num_blocks=7)  # 6 usable blocks
    a = list(range(17))
    _run(s, SeqState("a", a, 17))
    s.finish("a")
    assert s.pool.num_evictable == 4 and s.pool.num_free == 6
    _run(s, SeqState("b", list(range(50, 66)), 16))  # 4 blocks: 2 free + the 2 last of "a"
    assert cache.num_cached_blocks == 2 + 4
    s.finish("b")
    again = SeqState("a2", a, 17)
    s.add(again)
    s.schedule()
    assert again.num_cached_tokens == 8  # "a"'s first two blocks survived


def test_reset_forgets_every_block() -> None:
    s, cache = _sched()
    _run(s, SeqState("a", list(range(9)), 9))
    cache.reset()
    s.finish("a")
    assert s.pool.num_evictable == 0 and cache.num_cached_blocks == 0
    seq = SeqState("b", list(range(9)), 9)
    s.add(seq)
    s.schedule()
    assert seq.num_cached_tokens == 0


def _records_seq(rid: str, toks: Sequence[int], k: int) -> SeqState:
    return SeqState(rid, list(toks), len(toks), prompt_records_k=k)


def test_prompt_records_must_cover_a_hit_or_it_is_cut() -> None:
    s, cache = _sched()
    toks = list(range(200, 213))  # 13 tokens: blocks 0..2 full
    first = _records_seq("a", toks, -1)
    _run(s, first)
    s.finish("a")
    # no records kept: a request that wants them computes everything
    want = _records_seq("b", toks, 2)
    s.add(want)
    s.step_done(s.schedule())
    assert want.num_cached_tokens == 0
    recs = {p: ("rec", p) for p in range(1, 13)}
    cache.attach_records(want, recs.get, 5)
    s.finish("b")
    # now every block holds records of 5 alternatives and the next target's record
    more = _records_seq("c", toks, 5)
    s.add(more)
    s.schedule()
    assert more.num_cached_tokens == 12
    assert more.cached_records == {p: ("rec", p) for p in range(1, 13)}
    s.finish("c")
    # more alternatives than kept: recompute
    wide = _records_seq("d", toks, 6)
    s.add(wide)
    s.schedule()
    assert wide.num_cached_tokens == 0
    s.finish("d")
    # the boundary record (the target right after the hit) serves only the same next token
    same = _records_seq("e", [*toks, 7], 1)
    s.add(same)
    s.schedule()
    assert same.num_cached_tokens == 12
    s.finish("e")
    other = _records_seq("f", [*toks[:12], 7, 7], 1)  # differs at position 12: one block less
    s.add(other)
    s.schedule()
    assert other.num_cached_tokens == 8
    assert max(other.cached_records) == 8


# ---------------------------------------------------------------- the default model
PROMPT_LP = SamplingParams(
    max_new_tokens=4,
    temperature=0,
    return_k_alternatives=5,
    decoder_input_details=True,
    prompt_k_alternatives=5,
)


def _prompt(tag: str, n: int = 40) -> str:
    return f"{tag}: " + ", ".join(f"{tag} item {i}" for i in range(n))


def _same(a, b, exact_upto: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Equal outputs; prompt records at positions below ``exact_upto`` (served from the cache)
    bit for bit, the others (computed in other chunks) to float noise."""
    assert a.token_ids == b.token_ids
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert x.rank == y.rank
        assert [t.id for t in x.alternatives or []] == [t.id for t in y.alternatives or []]
    if b.prompt_tokens is None:
        return
    assert a.prompt_tokens is not None
    for pos, (x, y) in enumerate(zip(a.prompt_tokens, b.prompt_tokens, strict=True)):
        if pos == 0:
            continue
        tol = 0 if pos < exact_upto else 1e-4
        assert x.id == y.id and x.rank == y.rank
        assert x.logprob == pytest.approx(y.logprob, abs=tol)
        assert x.entropy == pytest.approx(y.entropy, abs=tol)
        assert [t.id for t in x.alternatives or []] == [t.id for t in y.alternatives or []]
        for s, t in zip(x.alternatives or [], y.alternatives or [], strict=True):
            assert s.logprob == pytest.approx(t.logprob, abs=tol)


def test_a_hit_returns_the_numbers_of_a_cold_prefill(llm) -> None:  # type: ignore[no-untyped-def]
    cache = llm.engine.prompts.cache
    prompt = _prompt("hit")
    (cold,) = llm.generate([prompt], PROMPT_LP)
    before = cache.hits
    (hot,) = llm.generate([prompt], PROMPT_LP)
    hit = cache.hits - before
    assert hit >= len(cold.prompt_tokens) - 16
    _same(hot, cold, exact_upto=hit)
    # a shorter k is cut from the kept records: the same as asking it cold
    (few,) = llm.generate([prompt], PROMPT_LP.with_updates(prompt_k_alternatives=2))
    assert all(len(t.alternatives) == 2 for t in few.prompt_tokens[1:])
    assert [t.alternatives[0].id for t in few.prompt_tokens[1:]] == [
        t.alternatives[0].id for t in cold.prompt_tokens[1:]
    ]


def test_records_missing_from_the_cache_are_computed(llm, hf_model) -> None:  # type: ignore[no-untyped-def]
    prompt = _prompt("missing", 30)
    (plain,) = llm.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0))
    (got,) = llm.generate([prompt], PROMPT_LP)  # KV cached without records: computed
    ids = [t.id for t in got.prompt_tokens]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for pos in range(1, len(ids)):
        rec = got.prompt_tokens[pos]
        assert rec.logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=2e-4)
        top = ref[pos - 1].topk(5)
        assert [t.id for t in rec.alternatives][:1] == top.indices[:1].tolist()
    before = llm.engine.prompts.cache.hits
    (again,) = llm.generate([prompt], PROMPT_LP)  # now a hit, records included
    _same(again, got, exact_upto=llm.engine.prompts.cache.hits - before)
    assert plain.token_ids == got.token_ids[:1]


def test_score_like_continuations_share_the_context(llm) -> None:  # type: ignore[no-untyped-def]
    tok = llm.tokenizer
    context = tok.encode(_prompt("context", 25))
    conts = [tok.encode(f" answer {c}") for c in "ABCD"]
    p = SamplingParams(
        max_new_tokens=1, temperature=0, decoder_input_details=True, prompt_k_alternatives=3
    )
    cache = llm.engine.prompts.cache
    before = cache.hits
    warm = llm.generate([context + c for c in conts], p)
    assert cache.hits - before > 0
    for c, w in zip(conts, warm, strict=True):
        cache.reset()  # cold: nothing cached
        (cold,) = llm.generate([context + c], p)
        _same(w, cold)


def test_adapter_blocks_are_never_read_by_the_base_or_another_adapter(
    model_dir, peft_model
) -> None:  # type: ignore[no-untyped-def]
    # also a small pool: 40 blocks of 4 tokens, so caching, eviction and preemption meet
    eng = LLM(
        str(model_dir),
        progress=False,
        adapter_root=str(peft_model.root),
        max_lora_rank=8,
        block_size=4,
        num_blocks=40,
        max_model_len=96,
        max_k_alternatives=5,
    )
    cache = eng.engine.prompts.cache
    prompt = _prompt("lora", 10)
    out, hits = [], []
    for who in ("qv4", None, "all8", "qv4"):
        before = cache.hits
        out += eng.generate([prompt], PROMPT_LP.with_updates(adapter_id=who))
        hits.append(cache.hits - before)
    assert hits[:3] == [0, 0, 0] and hits[3] > 0
    _same(out[3], out[0], exact_upto=hits[3])
    base, lora = out[1].prompt_tokens, out[0].prompt_tokens
    assert any(x.logprob != y.logprob for x, y in zip(base[1:], lora[1:], strict=True))
    # many distinct prompts through the small pool: cached blocks are evicted, requests are
    # preempted, nothing breaks and nothing stays held
    many = [_prompt(f"evict{i}", 8) for i in range(6)]
    res = eng.generate(many, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert all(len(r.token_ids) == 12 for r in res)
    assert eng.engine.pool.num_used == 0
    again = eng.generate(many, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert [r.token_ids for r in again] == [r.token_ids for r in res]


def test_metrics_and_info_report_the_cache(server) -> None:  # type: ignore[no-untyped-def]
    import httpx

    body = {"inputs": _prompt("served", 20), "parameters": {"max_new_tokens": 1}}
    for _ in range(2):
        assert httpx.post(server.url + "/generate", json=body, timeout=120).status_code == 200
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["prefix_caching"] is True
    assert info["prefix_cache_hits"] > 0 and 0 < info["prefix_cache_hit_rate"] <= 1
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert "truffula_prefix_cache_queries_total" in text
    assert "truffula_prefix_cache_hits_total" in text
