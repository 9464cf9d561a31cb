"""Tensor parallelism on two CUDA GPUs (NCCL), against one GPU, on the tiny random-weight Llama
in float32: greedy tokens identical; logprobs, ranks, entropies, alternatives and prompt
logprobs within 1e-4, for base, adapter and seeded sampled requests in one batch. Both engines
replay CUDA graphs, so the rank's graphs hold NCCL all-reduces; the two-rank engine is also run
eagerly. Skipped without two GPUs (CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed.tiny import PROMPTS, assert_same, engine, greedy, make_adapter, make_model, seeded
from truffula.sampling.params import SamplingParams

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)


def cuda_engine(folder: Path, tp: int, **options: object):  # type: ignore[no-untyped-def]
    return engine(
        folder, tp, device="cuda", dtype="float32", block_size=16, max_num_seqs=8, **options
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model(tmp_path_factory.mktemp("tiny-llama-cuda"))
    make_adapter(folder, folder / "adapters" / "a1")
    return folder


def requests() -> tuple[list[str], list[SamplingParams]]:
    params = [greedy(), greedy(adapter_id="a1"), seeded(adapter_id="a1")]
    return [PROMPTS[0], PROMPTS[1], PROMPTS[2]], params


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_two_gpus_match_one(tiny: Path, graphs: bool) -> None:
    prompts, params = requests()
    one = cuda_engine(tiny, 1)
    ref = one.generate(prompts, params)
    single = [one.generate([p], [q])[0] for p, q in zip(prompts, params, strict=True)]
    del one
    torch.cuda.empty_cache()
    two = cuda_engine(tiny, 2, cuda_graph_max_batch=None if graphs else 0)
    try:
        assert (two.engine.runner.graphs is not None) == graphs
        got = two.generate(prompts, params)
        alone = [two.generate([p], [q])[0] for p, q in zip(prompts, params, strict=True)]
    finally:
        two.close()
    for r, g in zip(ref + single, got + alone, strict=True):
        assert_same(r, g)
