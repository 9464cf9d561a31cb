"""Defaults sized to the machine: the KV cache, the step budget, the running-request cap.

The arithmetic (``truffula.runner.sizing``) is checked on made-up GPU numbers; the engine on the
CPU with a tiny random Llama (the default model's tokenizer) and the session's default model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from truffula.config import CacheConfig, EngineConfig
from truffula.runner.sizing import (
    CPU_KV_CAP,
    CacheTooSmallError,
    CudaMemory,
    EngineSizing,
    GiB,
    MiB,
    choose_kv_cache,
    cuda_kv_budget,
    profile_layout,
)

# an 8B Llama in bf16: 32 layers x (K + V) x 8 kv heads x 128 dims x 2 bytes per token
PER_TOKEN_8B = 32 * 2 * 8 * 128 * 2
PER_BLOCK_8B = 16 * PER_TOKEN_8B  # 2 MiB


def h200(free_after_weights: int = 122 * GiB, weights: int = 16 * GiB) -> CudaMemory:
    return CudaMemory(
        total=140 * GiB,
        free=free_after_weights,
        weights=weights,
        activations=3 * GiB,
        graphs=256 * MiB,
    )


# ---------------------------------------------------------------- the arithmetic
def test_cuda_kv_bytes_are_the_utilization_less_what_is_in_use() -> None:
    mem = h200()
    assert mem.other == 2 * GiB  # 140 - 122 free - 16 weights: CUDA context, other processes
    budget = cuda_kv_budget(mem, 0.90)
    assert budget == int(140 * GiB * 0.90) - 16 * GiB - 2 * GiB - 3 * GiB - 256 * MiB
    choice = choose_kv_cache(
        CacheConfig(), bytes_per_block=PER_BLOCK_8B, max_len=8192, max_num_seqs=256, cuda=mem
    )
    assert choice.source == "auto"
    assert choice.num_blocks == budget // PER_BLOCK_8B - 1  # one null block beside them
    assert 0 < (choice.num_blocks + 1) * PER_BLOCK_8B <= budget
    assert choice.num_blocks * 16 > 400_000  # tokens, against 8,176 with the old 1 GiB default
    assert "0.90 x 140.0 GiB - 16.0 GiB weights - 3.0 GiB activations" in choice.reason


def test_other_processes_and_utilization_shrink_the_cuda_cache() -> None:
    kw: dict = dict(bytes_per_block=PER_BLOCK_8B, max_len=8192, max_num_seqs=256)
    alone = choose_kv_cache(CacheConfig(), cuda=h200(), **kw)
    shared = choose_kv_cache(CacheConfig(), cuda=h200(free_after_weights=102 * GiB), **kw)
    assert (alone.num_blocks - shared.num_blocks) * PER_BLOCK_8B == 20 * GiB
    half = choose_kv_cache(CacheConfig(gpu_memory_utilization=0.5), cuda=h200(), **kw)
    assert (alone.num_blocks - half.num_blocks) * PER_BLOCK_8B == pytest.approx(
        0.4 * 140 * GiB, abs=PER_BLOCK_8B
    )


def test_the_cuda_cache_stops_at_what_the_running_requests_can_use() -> None:
    # a tiny model: 90% of the GPU would be millions of blocks no request could fill
    choice = choose_kv_cache(
        CacheConfig(), bytes_per_block=8192, max_len=512, max_num_seqs=8, cuda=h200()
    )
    assert choice.num_blocks == 8 * 512 // 16
    assert "capped at 8 sequences of 512 tokens" in choice.reason


def test_too_little_gpu_memory_is_an_error_naming_the_flags() -> None:
    busy = h200(free_after_weights=12 * GiB)  # another process holds 110 GiB
    with pytest.raises(CacheTooSmallError) as err:
        choose_kv_cache(
            CacheConfig(), bytes_per_block=PER_BLOCK_8B, max_len=8192, max_num_seqs=256, cuda=busy
        )
    msg = str(err.value)
    assert "8192 tokens" in msg and "--gpu-memory-utilization" in msg
    assert "--kv-cache-memory" in msg and "--max-model-len" in msg


def test_explicit_sizes_win_over_the_measurements() -> None:
    kw: dict = dict(bytes_per_block=PER_BLOCK_8B, max_len=8192, max_num_seqs=256, cuda=h200())
    mem = choose_kv_cache(CacheConfig(kv_cache_memory=4 * GiB), **kw)
    assert (mem.num_blocks, mem.source) == (4 * GiB // PER_BLOCK_8B - 1, "flag")
    blocks = choose_kv_cache(CacheConfig(num_blocks=600, kv_cache_memory=4 * GiB), **kw)
    assert (blocks.num_blocks, blocks.source) == (600, "flag")


def test_cpu_cache_is_a_capped_share_of_available_ram() -> None:
    kw: dict = dict(bytes_per_block=16 * 46080, max_len=8192, max_num_seqs=64)  # default model
    big = choose_kv_cache(CacheConfig(), host_available=24 * GiB, **kw)
    assert (big.num_blocks + 1) * 16 * 46080 <= CPU_KV_CAP < (big.num_blocks + 2) * 16 * 46080
    small = choose_kv_cache(CacheConfig(), host_available=4 * GiB, **kw)
    assert (small.num_blocks + 1) * 16 * 46080 <= 0.1 * 4 * GiB
    assert small.num_blocks * 16 >= 8192
    # so little RAM that a tenth of it is less than one sequence: raised to one sequence
    tight = choose_kv_cache(CacheConfig(), host_available=1 * GiB, **kw)
    assert tight.num_blocks == 8192 // 16 and "raised to one sequence" in tight.reason


def test_cpu_cache_that_cannot_hold_one_sequence_is_an_error() -> None:
    with pytest.raises(CacheTooSmallError, match="--max-model-len"):
        choose_kv_cache(
            CacheConfig(),
            bytes_per_block=16 * 262144,  # 8B in fp32, 128k context: 32 GiB per sequence
            max_len=131072,
            max_num_seqs=64,
            host_available=48 * GiB,
        )


def test_a_flagged_cache_too_small_for_one_sequence_names_its_flag() -> None:
    kw: dict = dict(bytes_per_block=PER_BLOCK_8B, max_len=8192, max_num_seqs=256)
    with pytest.raises(CacheTooSmallError, match="--num-kv-blocks") as err:
        choose_kv_cache(CacheConfig(num_blocks=100), **kw)
    assert "1,600 tokens" in str(err.value) and "--max-model-len" in str(err.value)
    with pytest.raises(CacheTooSmallError, match="raise --kv-cache-memory"):
        choose_kv_cache(CacheConfig(kv_cache_memory=1 * GiB), **kw)


def test_profile_layout_fills_the_budget_with_the_widest_step() -> None:
    for budget, seqs, max_len in [
        (8192, 256, 8192),
        (512, 64, 8192),
        (8192, 256, 2048),
        (7, 64, 4),
    ]:
        layout = profile_layout(budget, seqs, max_len)
        assert sum(n for _, n in layout) == budget
        assert len(layout) <= seqs
        assert all(start >= 1 and start + n == max_len for start, n in layout)
        ones = [n == 1 for _, n in layout]
        assert ones == sorted(ones, reverse=True)  # decodes first


def test_batching_limits_default_by_device() -> None:
    cfg = EngineConfig()
    assert cfg.scheduler.max_num_batched_tokens is None and cfg.cache.kv_cache_memory is None
    gpu = cfg.for_device("cuda")
    assert (gpu.scheduler.max_num_batched_tokens, gpu.scheduler.max_num_seqs) == (8192, 256)
    assert gpu.model.cuda_graph_max_batch == 256
    cpu = cfg.for_device("cpu")
    assert (cpu.scheduler.max_num_batched_tokens, cpu.scheduler.max_num_seqs) == (512, 64)
    mine = EngineConfig.from_kwargs(max_num_seqs=32, cuda_graph_max_batch=64).for_device("cuda")
    assert mine.scheduler.max_num_seqs == 32 and mine.scheduler.max_num_batched_tokens == 8192
    assert mine.model.cuda_graph_max_batch == 32  # no graph larger than the cap
    assert mine.for_device("cpu") == mine  # resolved once


def test_cli_flags_default_to_automatic() -> None:
    from truffula.cli import build_parser, engine_config

    cfg = engine_config(build_parser().parse_args(["generate"]))
    assert cfg.cache.kv_cache_memory is None and cfg.cache.num_blocks is None
    assert cfg.cache.gpu_memory_utilization == 0.90
    assert cfg.scheduler.max_num_batched_tokens is None and cfg.scheduler.max_num_seqs is None
    assert cfg.model.cuda_graph_max_batch is None
    args = ["generate", "--kv-cache-memory", "2GiB", "--gpu-memory-utilization", "0.5"]
    args += ["--max-batch-tokens", "1024", "--max-num-seqs", "16", "--cuda-graph-max-batch", "8"]
    cfg = engine_config(build_parser().parse_args(args))
    assert cfg.cache.kv_cache_memory == 2 * GiB and cfg.cache.gpu_memory_utilization == 0.5
    assert (cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs) == (1024, 16)
    assert cfg.model.cuda_graph_max_batch == 8


def test_the_gpu_code_imports_without_cuda() -> None:
    import truffula.runner.graphs as graphs

    assert graphs.ladder(256)[:5] == [1, 2, 4, 8, 16] and graphs.ladder(256)[-1] == 256
    assert graphs.ladder(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graphs.token_ladder(512) == [32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert graphs.token_ladder(300)[-2:] == [256, 300] and graphs.token_ladder(0) == []
    # every tile of a layout fits the map sized for its token count and sequence bound
    lens = [1, 1, 1, 37, 16, 2]
    seq, q0, piece, pieces = graphs.tile_map(lens, 16, graphs.max_tiles(sum(lens), 8, 16))
    assert seq[:7] == [0, 1, 2, 3, 3, 3, 4] and q0[3:7] == [0, 16, 32, 0] and set(seq[8:]) == {-1}
    assert set(piece) == {0} and set(pieces) == {1}  # no key lengths: no tile is split


def test_long_key_ranges_are_split_into_pieces_while_the_map_has_room() -> None:
    import truffula.runner.graphs as graphs

    # a 100-token chunk after 3,900 cached tokens and one short decode: 7 + 1 tiles of 16
    seq, q0, piece, pieces = graphs.tile_map([100, 1], 16, 40, [4000, 50], pieces=24)
    entries = [e for e in zip(seq, q0, piece, pieces, strict=True) if e[0] >= 0]
    assert len(entries) == 24 and set(seq[24:]) == {-1} and set(pieces[24:]) == {1}
    assert (1, 0, 0, 1) in entries  # 50 keys: never split
    tiles = {(s, q): n for s, q, _, n in entries}
    assert sum(tiles.values()) == 24 and len(tiles) == 8
    for (s, q), n in tiles.items():  # a tile's pieces are consecutive entries 0..n-1
        at = entries.index((s, q, 0, n))
        assert [e[2] for e in entries[at : at + n]] == list(range(n))
        keys = min(4000, 4000 - 100 + q + 16) if s == 0 else 50
        assert keys >= n * 256 or n == 1  # a piece walks at least min_keys keys
    # the longest ranges got the most pieces
    assert tiles[0, 96] >= tiles[0, 0] >= 2
    # no room (the map is full of tiles), or no key lengths: nothing is split
    assert set(graphs.tile_map([100, 1], 16, 8, [4000, 50], pieces=24)[3]) == {1}


# ---------------------------------------------------------------- the engine on the CPU
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_dir) -> Path:  # type: ignore[no-untyped-def]
    """A 2-layer random Llama with a 256-token context: 512 bytes of KV per token in fp32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    return folder


def test_default_model_on_cpu_serves_its_whole_context(llm) -> None:  # type: ignore[no-untyped-def]
    s: EngineSizing = llm.engine.sizing
    assert s.device == "cpu" and s.kv_cache_source == "auto" and s.max_len_source == "auto"
    assert s.max_len == llm.engine.max_len == 8192  # the model's context, not cut to the cache
    assert s.kv_capacity_tokens >= s.max_len
    assert s.kv_capacity_tokens == llm.engine.pool.capacity * s.block_size
    assert s.kv_cache_bytes <= max(CPU_KV_CAP, (s.max_len // s.block_size + 1) * 16 * 46080)
    assert (s.max_num_batched_tokens, s.max_num_seqs) == (512, 64)
    assert s.graph_batch_sizes == ()
    cfg = llm.engine.config.scheduler  # the engine's config holds the resolved numbers
    assert (cfg.max_num_batched_tokens, cfg.max_num_seqs) == (512, 64)


def test_engine_logs_its_sizing_and_an_explicit_cache_wins(tiny, caplog) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    with caplog.at_level(logging.INFO, logger="truffula.engine"):
        llm = LLM(str(tiny), progress=False, kv_cache_memory="1MiB", max_num_seqs=4)
    s = llm.engine.sizing
    assert s.kv_bytes_per_token == 512 and s.kv_cache_source == "flag"
    assert s.num_blocks == (1 << 20) // (16 * 512) - 1 == llm.engine.pool.capacity
    assert (s.max_num_seqs, s.max_num_seqs_source) == (4, "flag")
    assert (s.max_num_batched_tokens, s.max_num_batched_tokens_source) == (512, "auto")
    lines = [r.getMessage() for r in caplog.records if r.name == "truffula.engine"]
    line = next(m for m in lines if m.startswith("sizing:"))
    assert "KV cache 1.0 MiB (flag: --kv-cache-memory 1.0 MiB)" in line
    assert "2,032 tokens" in line and "4 running requests (flag)" in line
    (out,) = llm.generate(["hello"], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(out.token_ids) == 4

    auto = LLM(str(tiny), progress=False, max_num_seqs=4).engine.sizing
    assert auto.kv_cache_source == "auto" and auto.max_len == 256
    assert auto.num_blocks == 4 * 256 // 16  # all four requests at the full length, no more


def test_engine_cache_too_small_for_one_sequence_is_a_clear_error(tiny) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    with pytest.raises(CacheTooSmallError) as err:
        LLM(str(tiny), progress=False, num_blocks=8)  # 128 tokens, the model's context is 256
    assert "--num-kv-blocks" in str(err.value) and "--max-model-len" in str(err.value)
    capped = LLM(str(tiny), progress=False, num_blocks=8, max_model_len=128).engine
    assert capped.max_len == 128 and capped.sizing.max_len_source == "flag"


def test_cli_reports_a_cache_too_small_without_a_traceback(tiny, capsys) -> None:  # type: ignore[no-untyped-def]
    from truffula.cli import main

    rc = main(["generate", "hi", "--model", str(tiny), "--kv-cache-memory", "64KiB"])
    err = capsys.readouterr().err
    assert rc == 2 and "--kv-cache-memory" in err and "Traceback" not in err


def test_bf16_on_cpu_caches_float32_and_changes_nothing(tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A 16-bit model on CPU keeps its keys and values in a float32 cache (decode attention runs
    in float32 there and reads it in place); its tokens, logprobs, ranks and alternatives equal
    those of a bf16 cache exactly: decodes, prompt logprobs, and prompts prefilled in chunks after
    cached tokens (a 16-token step budget; the second round hits the prefix cache)."""
    from truffula.engine.llm import LLM
    from truffula.runner import kv_cache
    from truffula.sampling.params import SamplingParams

    params = SamplingParams(
        max_new_tokens=10,
        temperature=0,
        ignore_eos=True,
        details=True,
        return_k_alternatives=3,
        prompt_k_alternatives=2,
    )
    base = [(7 * i) % 4000 + 10 for i in range(40)]
    prompts = [base, [*base[:24], 11, 12, 13, 14, 15, 16, 17, 18, 19]]

    def records(llm: LLM) -> list[object]:
        got: list[object] = []
        for _ in range(2):
            for out in llm.generate(prompts, params):
                for t in [*(out.prompt_tokens or []), *out.tokens]:
                    alts = [(a.id, a.logprob) for a in t.alternatives or ()]
                    got.append((t.id, t.logprob, t.rank, t.entropy, alts))
        return got

    opts = {"dtype": "bfloat16", "progress": False, "max_num_batched_tokens": 16}
    wide = LLM(str(tiny), **opts)  # type: ignore[arg-type]
    assert wide.engine.runner.kv_cache.dtype == torch.float32
    monkeypatch.setattr(kv_cache, "cache_dtype", lambda device, dtype: dtype)
    narrow = LLM(str(tiny), **opts)  # type: ignore[arg-type]
    assert narrow.engine.runner.kv_cache.dtype == torch.bfloat16
    assert records(wide) == records(narrow)
