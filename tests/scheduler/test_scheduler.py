"""The scheduler and block pool, with no model: plain data in, plain data out."""

from __future__ import annotations

import random

import pytest

from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.scheduler import Scheduler, SeqState, SeqStatus


def make(
    num_blocks: int = 64, block_size: int = 4, budget: int = 16, max_seqs: int = 8
) -> Scheduler:
    return Scheduler(BlockPool(num_blocks), block_size, budget, max_seqs)


def seq(rid: str, n: int) -> SeqState:
    return SeqState(rid, list(range(100, 100 + n)), n)


def run_step(s: Scheduler, sampled: int = 7):  # type: ignore[no-untyped-def]
    """Schedule, mark computed, append a sampled token to every sequence that sampled."""
    out = s.schedule()
    s.step_done(out)
    for sch in out.seqs:
        if sch.sample:
            st = s.get(sch.request_id)
            assert st is not None
            st.token_ids.append(sampled)
    return out


def test_block_pool_alloc_free_refcount() -> None:
    pool = BlockPool(5)
    assert pool.capacity == 4 and pool.num_free == 4
    a = pool.allocate(3)
    assert 0 not in a and len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(MemoryError):
        pool.allocate(2)
    pool.share(a[:1])
    assert pool.ref_count(a[0]) == 2
    pool.free(a)
    assert pool.num_free == 3  # a[0] still held by its second owner
    pool.free(a[:1])
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.free(a[:1])


def test_prefill_is_chunked_by_token_budget() -> None:
    s = make(budget=16)
    s.add(seq("a", 40))
    sizes = []
    while True:
        out = run_step(s)
        sizes.append([x.num_tokens for x in out.seqs])
        if out.seqs[0].sample:
            break
    assert sizes == [[16], [16], [8]]
    assert s.get("a").num_computed == 40 and len(s.get("a").token_ids) == 41


def test_new_requests_join_between_steps_and_decodes_go_first() -> None:
    s = make(budget=16)
    s.add(seq("a", 5))
    out = run_step(s)
    assert [x.request_id for x in out.seqs] == ["a"]
    s.add(seq("b", 30))
    out = run_step(s)
    # a decodes (1 token) first, b gets the rest of the budget as a prefill chunk
    assert [(x.request_id, x.num_tokens) for x in out.seqs] == [("a", 1), ("b", 15)]
    assert out.seqs[0].sample and not out.seqs[1].sample


def test_decodes_never_starve_behind_a_long_prefill() -> None:
    s = make(budget=8, max_seqs=8)
    for i in range(4):
        s.add(seq(f"d{i}", 2))
    run_step(s)  # prefill all four short prompts (8 tokens)
    s.add(seq("long", 200))
    for _ in range(10):
        out = run_step(s)
        got = {x.request_id: x.num_tokens for x in out.seqs}
        assert all(got.get(f"d{i}") == 1 for i in range(4)), got
        assert got.get("long", 0) == 4


def test_positions_and_blocks_are_consistent() -> None:
    s = make(block_size=4, budget=10)
    s.add(seq("a", 9))
    out = run_step(s)
    (a,) = out.seqs
    assert a.start_pos == 0 and a.num_tokens == 9 and len(a.block_ids) == 3
    out = run_step(s)
    (a,) = out.seqs
    assert a.start_pos == 9 and a.token_ids == [7] and len(a.block_ids) == 3
    run_step(s)
    run_step(s)
    out = run_step(s)  # position 12 needs a fourth block
    assert out.seqs[0].start_pos == 12 and len(out.seqs[0].block_ids) == 4


def test_preempts_newest_and_requeues_it_first() -> None:
    s = make(num_blocks=7, block_size=4, budget=64, max_seqs=8)  # 6 usable blocks = 24 tokens
    s.add(seq("old", 8))
    s.add(seq("new", 8))
    run_step(s)  # 2 + 2 blocks
    for _ in range(8):  # each grows to 4 blocks -> 8 blocks needed, 6 exist
        out = run_step(s)
        if out.preempted_ids:
            break
    assert out.preempted_ids == ["new"]
    victim = s.get("new")
    assert (
        victim.status is SeqStatus.WAITING and victim.num_computed == 0 and victim.block_ids == []
    )
    assert len(victim.token_ids) > 8  # generated tokens are kept for recompute
    assert s.waiting[0] is victim
    s.finish("old")
    out = s.schedule()
    assert out.seqs[0].request_id == "new" and out.seqs[0].start_pos == 0
    assert out.seqs[0].num_tokens == len(victim.token_ids)  # recompute prompt + outputs


def test_a_lone_request_that_cannot_grow_preempts_itself_without_crashing() -> None:
    s = make(num_blocks=3, block_size=4, budget=64)  # 2 usable blocks = 8 tokens
    s.add(seq("a", 7))
    run_step(s)
    run_step(s)  # position 7 fits
    out = run_step(s)  # position 8 needs a third block
    assert out.preempted_ids == ["a"] and out.seqs == []


def test_finish_frees_blocks_and_reports_to_runner() -> None:
    s = make()
    s.add(seq("a", 10))
    run_step(s)
    used = s.pool.num_used
    assert used == 3
    s.finish("a")
    assert s.pool.num_used == 0
    out = s.schedule()
    assert out.finished_ids == ["a"]
    assert s.schedule().finished_ids == []


def test_max_num_seqs_limits_running() -> None:
    s = make(max_seqs=2, budget=100)
    for i in range(4):
        s.add(seq(f"r{i}", 3))
    out = run_step(s)
    assert {x.request_id for x in out.seqs} == {"r0", "r1"}
    s.finish("r0")
    out = run_step(s)
    assert {x.request_id for x in out.seqs} == {"r1", "r2"}


def test_admission_hook_holds_requests_back() -> None:
    allowed = {"a"}
    s = Scheduler(BlockPool(32), 4, 64, 8, admit=lambda q: -1 if q.request_id in allowed else None)
    s.add(seq("b", 3))
    s.add(seq("a", 3))
    out = s.schedule()  # b may not run yet: it keeps its place, a behind it runs
    assert [x.request_id for x in out.seqs] == ["a"]
    assert [q.request_id for q in s.waiting] == ["b"]
    allowed.add("b")
    out = s.schedule()
    assert {x.request_id for x in out.seqs} == {"a", "b"}


def test_random_workload_never_leaks_or_drops() -> None:
    rng = random.Random(0)
    s = make(num_blocks=20, block_size=4, budget=12, max_seqs=6)
    targets = {}
    for i in range(30):
        rid = f"r{i}"
        s.add(seq(rid, rng.randint(1, 20)))
        targets[rid] = rng.randint(1, 12)
    done: set[str] = set()
    for _ in range(3000):
        if not s.has_work():
            break
        out = run_step(s)
        for x in out.seqs:
            st = s.get(x.request_id)
            assert x.start_pos + x.num_tokens <= len(x.block_ids) * 4
            if x.sample and len(st.token_ids) - st.prompt_len >= targets[x.request_id]:
                s.finish(x.request_id)
                done.add(x.request_id)
        held = sum(len(q.block_ids) for q in s.running)
        assert held == s.pool.num_used
    assert done == set(targets)
    assert s.pool.num_used == 0


def test_prefill_while_decoding_is_capped_and_uncapped_without_decodes() -> None:
    s = Scheduler(BlockPool(256), 4, 64, 16, max_prefill_while_decoding=10)
    for rid in "abe":
        s.add(seq(rid, 20))
    first = run_step(s)  # nothing decodes yet: the whole budget goes to prefill
    assert sum(x.num_tokens for x in first.seqs) == 60
    s.add(seq("c", 25))
    s.add(seq("d", 25))
    chunks: list[list[int]] = []
    while any(st.num_pending > 1 for st in [s.get("c"), s.get("d")] if st is not None):
        out = run_step(s)
        decodes = [x for x in out.seqs if x.num_tokens == 1 and x.request_id in "abe"]
        assert len(decodes) == 3  # the running requests decode in every step
        chunks.append([x.num_tokens for x in out.seqs if x.request_id in "cd" and x.start_pos < 25])
    assert all(sum(c) <= 10 for c in chunks)
    assert sum(map(sum, chunks)) == 50 and len(chunks) == 5
    # a step that decodes nothing is not held to the cap
    lone = Scheduler(BlockPool(256), 4, 64, 16, max_prefill_while_decoding=10)
    lone.add(seq("e", 40))
    assert run_step(lone).seqs[0].num_tokens == 40


def test_a_burst_as_large_as_the_running_set_prefills_with_the_whole_budget() -> None:
    """Two decode; two arrive: as many wait as run, so the step is not held to the cap. With one
    running slot left only one of them could start: the two decodes outnumber it, cap again."""
    for max_seqs, expect in ((16, 50), (3, 10)):
        s = Scheduler(BlockPool(256), 4, 64, max_seqs, max_prefill_while_decoding=10)
        s.add(seq("a", 20))
        s.add(seq("b", 20))
        run_step(s)
        s.add(seq("c", 25))
        s.add(seq("d", 25))
        out = run_step(s)
        assert [x.num_tokens for x in out.seqs if x.request_id in "ab"] == [1, 1]
        assert sum(x.num_tokens for x in out.seqs if x.request_id in "cd") == expect
