"""Gemma 2 (sandwich norms, attention and final logit soft-capping, scaled embeddings), Phi-3
(q/k/v and gate/up stored fused in the checkpoint) and Mixtral (routed experts, each sharded)
over two ranks: the same greedy tokens and statistics as one process, with and without an
adapter (on attention only for Mixtral)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.tiny import PROMPTS, assert_same, engine, greedy, make_adapter, make_model

pytestmark = pytest.mark.slow  # spawns tensor-parallel ranks

EXTRA: dict[str, dict[str, object]] = {
    "gemma2": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0,
        tie_word_embeddings=True,
    ),
    "phi3": dict(pad_token_id=0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("kind", sorted(EXTRA))
def test_matches_one_process(kind: str, tmp_path: Path) -> None:
    folder = make_model(tmp_path / kind, kind, **EXTRA[kind])
    make_adapter(folder, folder / "adapters" / "a1", mlp=kind != "mixtral")
    one, two = engine(folder, 1), engine(folder, 2)
    try:
        params = [greedy(), greedy(adapter_id="a1")]
        ref = one.generate(PROMPTS[1:3], params)
        got = two.generate(PROMPTS[1:3], params)
        for r, g in zip(ref, got, strict=True):
            assert_same(r, g)
    finally:
        two.close()
