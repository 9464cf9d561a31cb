"""Tensor parallelism on CPU (gloo, 2 processes) against one process, on the same tiny
random-weight Llama (4 heads, 2 KV heads, biases on every projection so the row-parallel bias
path runs): greedy tokens identical; logprobs, ranks, entropies, alternatives (ids and
logprobs) and prompt logprobs within 1e-4; a LoRA adapter in a mixed batch; a seeded sampled
request; refusals; and a worker killed mid-service ending the engine with an error, not a
hang. One TP engine serves the whole module (spawned ranks import torch: seconds each)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from distributed.tiny import (
    PROMPTS,
    assert_same,
    engine,
    greedy,
    make_adapter,
    make_model,
    seeded,
)
from truffula.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model(tmp_path_factory.mktemp("tiny-llama"))
    make_adapter(folder, folder / "adapters" / "a1")
    make_adapter(folder, folder / "adapters" / "a2", seed=2)
    return folder


@pytest.fixture(scope="module")
def pair(tiny: Path):  # type: ignore[no-untyped-def]
    one = engine(tiny, 1)
    two = engine(tiny, 2)
    yield one, two
    two.close()


@pytest.mark.slow  # spawns tensor-parallel ranks
def test_greedy_base_matches_one_process(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    ref = one.generate(PROMPTS, greedy())
    got = two.generate(PROMPTS, greedy())
    for r, g in zip(ref, got, strict=True):
        assert len(r.token_ids) == 6
        assert_same(r, g)


@pytest.mark.slow  # spawns tensor-parallel ranks
def test_mixed_batch_adapter_seeded_and_raw(pair) -> None:  # type: ignore[no-untyped-def]
    """Base, adapter and seeded sampled requests in one batch; raw and processed logprobs."""
    one, two = pair
    params = [
        greedy(),
        greedy(adapter_id="a1"),
        seeded(adapter_id="a1"),
        SamplingParams(
            max_new_tokens=6,
            temperature=0.7,
            seed=3,
            ignore_eos=True,
            repetition_penalty=1.2,
            return_k_alternatives=2,
            logprobs_mode="raw",
        ),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    ref = one.generate(prompts, params)
    got = two.generate(prompts, params)
    assert (
        ref[1].token_ids != ref[0].token_ids or ref[1].tokens[0].logprob != ref[0].tokens[0].logprob
    )
    for r, g in zip(ref, got, strict=True):
        assert_same(r, g)


@pytest.mark.slow  # spawns tensor-parallel ranks
def test_merged_adapters(pair) -> None:  # type: ignore[no-untyped-def]
    """LoRAX merges (linear, ties) reach every rank through the same slot writes."""
    from truffula.adapters.merge import MergeSpec

    one, two = pair
    for strategy, density in (("linear", None), ("ties", 0.5)):
        spec = MergeSpec.parse(["a1", "a2"], [0.6, 0.4], strategy, density, None)
        keys = [llm.engine.adapters.load_merged(spec, None) for llm in (one, two)]
        ref, got = (
            llm.generate(PROMPTS[:2], [greedy(adapter_id=key), greedy()])
            for llm, key in zip((one, two), keys, strict=True)
        )
        for r, g in zip(ref, got, strict=True):
            assert_same(r, g)


@pytest.mark.slow  # spawns tensor-parallel ranks
def test_one_kv_head_replicated(tmp_path: Path) -> None:
    """Fewer KV heads than ranks: each rank holds the one its query heads read (LoRA's k and v
    factors cut the same way)."""
    folder = make_model(tmp_path / "mqa", num_key_value_heads=1)
    make_adapter(folder, folder / "adapters" / "a1")
    one, two = engine(folder, 1), engine(folder, 2)
    try:
        params = [greedy(), greedy(adapter_id="a1")]
        ref = one.generate(PROMPTS[:2], params)
        got = two.generate(PROMPTS[:2], params)
        assert two.engine.sizing.kv_bytes_per_token == one.engine.sizing.kv_bytes_per_token
        for r, g in zip(ref, got, strict=True):
            assert_same(r, g)
    finally:
        two.close()


def test_refusals(tiny: Path, tmp_path: Path) -> None:
    odd = make_model(tmp_path / "odd", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2: .* 3 KV heads"):
        engine(odd, 2)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 4: .* 6 attention heads"):
        engine(odd, 4)
    odd_vocab = make_model(tmp_path / "odd-vocab", vocab_size=301)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2: .* 301 vocabulary"):
        engine(odd_vocab, 2)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: GPT2LMHeadModel cannot"):
        engine(gpt2, 2)
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"]}))
    with pytest.raises(ValueError, match="2: OPTForCausalLM would be served through transformers"):
        engine(gpt2, 2)
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: speculative"):
        engine(tiny, 2, speculative=spec)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        engine(tiny, 0)


def test_more_ranks_than_gpus(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from truffula.config import EngineConfig
    from truffula.distributed.launch import check_tensor_parallel

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = EngineConfig.from_kwargs(model=str(tiny), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: only 1 GPU"):
        check_tensor_parallel(config, tiny, torch.device("cuda"))
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: rank r runs on cuda:r"):
        check_tensor_parallel(config, tiny, torch.device("cuda", 1))


@pytest.mark.slow  # spawns tensor-parallel ranks
def test_worker_death_fails_the_engine(pair) -> None:  # type: ignore[no-untyped-def]
    """Last in the module: kills the shared engine's worker."""
    from truffula.errors import TensorParallelError

    _, two = pair
    proc = two.engine.ranks.workers.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with pytest.raises(TensorParallelError, match="rank 1 died"):
        two.generate(PROMPTS[:1], greedy())
    with pytest.raises(TensorParallelError, match="broken"):  # and every step after it
        two.engine.step()
    two.close()
    assert not any(p.is_alive() for p in two.engine.ranks.workers.procs)
