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
import torch

from truffula.sampling.params import SamplingParams

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "one two three four five six seven eight nine ten",
] * 20

PROMPTS = ["the quick brown", "hello world, this is", "one two three four five six"]
TOL = 1e-4


def make_model(folder: Path, **overrides: object) -> Path:
    """A tiny Llama with a trained byte-level BPE tokenizer, saved as safetensors."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)
    fields: dict[str, object] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=-(-len(tok) // 4) * 4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        attention_bias=True,
        mlp_bias=True,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    model.save_pretrained(folder)
    return folder


def make_adapter(model: Path, out: Path, rank: int = 4) -> None:
    """A PEFT adapter on every projection of every layer, random A and B."""
    from safetensors.torch import save_file

    cfg = json.loads((model / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (o, i) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.3
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"r": rank, "lora_alpha": 2 * rank, "peft_type": "LORA", "target_modules": []}
    (out / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model(tmp_path_factory.mktemp("tiny-llama"))
    make_adapter(folder, folder / "adapters" / "a1")
    return folder


def engine(folder: Path, tp: int, **options: object):  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    return LLM(
        str(folder),
        progress=False,
        device="cpu",
        tensor_parallel_size=tp,
        num_blocks=64,
        block_size=8,
        adapter_root=str(folder / "adapters"),
        linear_kernel="torch",
        **options,
    )


@pytest.fixture(scope="module")
def pair(tiny: Path):  # type: ignore[no-untyped-def]
    one = engine(tiny, 1)
    two = engine(tiny, 2)
    yield one, two
    two.engine.ranks.close()


def greedy(**extra: object) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        return_k_alternatives=4,
        prompt_k_alternatives=3,
        **extra,  # type: ignore[arg-type]
    )


def close(a: float | None, b: float | None) -> bool:
    assert a is not None and b is not None
    return abs(a - b) <= TOL


def assert_same(ref, got, exact_ids: bool = True) -> None:  # type: ignore[no-untyped-def]
    assert got.token_ids == ref.token_ids
    for r, g in zip(ref.tokens, got.tokens, strict=True):
        assert close(r.logprob, g.logprob) and close(r.entropy, g.entropy)
        assert r.rank == g.rank
        assert [a.id for a in r.alternatives or []] == [a.id for a in g.alternatives or []]
        for ra, ga in zip(r.alternatives or [], g.alternatives or [], strict=True):
            assert close(ra.logprob, ga.logprob)
    assert (ref.prompt_tokens is None) == (got.prompt_tokens is None)
    for r, g in zip(ref.prompt_tokens or [], got.prompt_tokens or [], strict=True):
        assert r.id == g.id and r.rank == g.rank
        if r.logprob is not None:
            assert close(r.logprob, g.logprob) and close(r.entropy, g.entropy)
            assert [a.id for a in r.alternatives or []] == [a.id for a in g.alternatives or []]


def test_greedy_base_matches_one_process(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    ref = one.generate(PROMPTS, greedy())
    got = two.generate(PROMPTS, greedy())
    for r, g in zip(ref, got, strict=True):
        assert len(r.token_ids) == 6
        assert_same(r, g)


def test_mixed_batch_adapter_seeded_and_raw(pair) -> None:  # type: ignore[no-untyped-def]
    """Base, adapter and seeded sampled requests in one batch; raw and processed logprobs."""
    one, two = pair
    params = [
        greedy(),
        greedy(adapter_id="a1"),
        SamplingParams(
            max_new_tokens=6,
            temperature=0.9,
            top_p=0.95,
            seed=7,
            ignore_eos=True,
            return_k_alternatives=3,
            adapter_id="a1",
        ),
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


def test_refusals(tiny: Path, tmp_path: Path) -> None:
    odd = make_model(tmp_path / "odd", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2: .* KV heads"):
        engine(odd, 2)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: GPT2LMHeadModel cannot"):
        engine(gpt2, 2)
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: speculative"):
        engine(tiny, 2, speculative=spec)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        engine(tiny, 0)


def test_worker_death_fails_the_engine(pair) -> None:  # type: ignore[no-untyped-def]
    """Last in the module: kills the shared engine's worker."""
    from truffula.errors import TensorParallelError

    _, two = pair
    proc = two.engine.ranks.workers.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with pytest.raises(TensorParallelError, match="rank 1 died"):
        two.generate(PROMPTS[:1], greedy())
