"""The statistics merged from vocabulary slices equal those of the whole logits: two gloo ranks
in threads of this process, against ``stats_of_logits`` and ``torch.argmax`` (ties: the lowest
id, across the ranks' slices too; tied alternatives may come in either order)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from truffula.distributed.parallel import connect, host_store, join_store
from truffula.distributed.stats import ShardedTokenStats
from truffula.kernels.stats_torch import stats_of_logits

VOCAB = 64


def on_two_ranks(work: Callable[[ShardedTokenStats, int], Any]) -> list[Any]:
    """``work(stats, rank)`` on ranks 0 and 1 at once; their results in rank order."""
    store = host_store(2)
    out: list[Any] = [None, None]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            group = connect(
                r, 2, torch.device("cpu"), store if r == 0 else join_store(store.port, 2)
            )
            out[r] = work(ShardedTokenStats(group, VOCAB), r)
            group.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def test_stats_and_argmax_merge_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, VOCAB) * 3
    x[1, 10] = x[1, 40] = 50.0  # a tie across the slices: the lower id wins
    x[2, 33] = x[2, 35] = 50.0  # a tie within one slice
    chosen = torch.tensor([3, 40, 63, 0, 31])  # targets of any rank (prompt logprobs)
    k = 5

    def work(stats: ShardedTokenStats, r: int) -> tuple[Any, ...]:
        part = x[:, r * 32 : (r + 1) * 32]
        return stats.argmax(part), stats.stats(part, chosen, k)

    results = on_two_ranks(work)
    want_ids, want_lps, want_ranks, want_ent = stats_of_logits(x, chosen, k)
    for argmax, (ids, lps, ranks, ent) in results:
        assert argmax.tolist() == x.argmax(dim=-1).tolist()
        assert argmax[1] == 10 and argmax[2] == 33
        assert ids[:, 0].tolist() == chosen.tolist()
        assert ranks.tolist() == want_ranks.tolist()
        torch.testing.assert_close(lps, want_lps, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
        # equal values may come in either order (as torch.topk's do on slices of other widths)
        assert [sorted(r) for r in ids[:, 1:].tolist()] == [
            sorted(r) for r in want_ids[:, 1:].tolist()
        ]
