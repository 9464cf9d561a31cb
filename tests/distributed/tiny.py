"""Tiny random-weight models with a trained BPE tokenizer, and the engines the tensor-parallel
tests compare."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from truffula.sampling.params import SamplingParams

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "one two three four five six seven eight nine ten",
] * 20

PROMPTS = ["the quick brown", "hello world, this is", "one two three four five six"]
TOL = 1e-4


def make_model(folder: Path, kind: str = "llama", **overrides: object) -> Path:
    """A tiny Llama (``kind``: or qwen3, gemma2, phi3) with a trained byte-level BPE tokenizer,
    saved as safetensors."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        LlamaConfig,
        MixtralConfig,
        Phi3Config,
        PreTrainedTokenizerFast,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "phi3": Phi3Config,
        "mixtral": MixtralConfig,
    }

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
    )
    if kind == "llama":  # biases on every projection: the row-parallel bias path runs
        fields.update(attention_bias=True, mlp_bias=True)
    fields.update(overrides)
    torch.manual_seed(0)
    config = classes[kind](**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    model.save_pretrained(folder)
    return folder


def make_adapter(model: Path, out: Path, rank: int = 4, mlp: bool = True, seed: int = 1) -> None:
    """A PEFT adapter on every projection of every layer (``mlp``: the MLP's too), random A
    and B."""
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
    if not mlp:
        shapes = {k: v for k, v in shapes.items() if k.startswith("self_attn.")}
    g = torch.Generator().manual_seed(seed)
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


def engine(folder: Path, tp: int, **options: object):  # type: ignore[no-untyped-def]
    """An engine of ``tp`` ranks on the CPU; ``options`` add to or replace these settings."""
    from truffula.engine.llm import LLM

    settings: dict[str, object] = dict(
        progress=False,
        device="cpu",
        tensor_parallel_size=tp,
        num_blocks=64,
        block_size=8,
        adapter_root=str(folder / "adapters"),
        linear_kernel="torch",
    )
    return LLM(str(folder), **(settings | options))  # type: ignore[arg-type]


def greedy(**extra: object) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        return_k_alternatives=4,
        prompt_k_alternatives=3,
        **extra,  # type: ignore[arg-type]
    )


def seeded(**extra: object) -> SamplingParams:
    """A seeded sampled request (temperature and top-p) with 3 alternatives."""
    return SamplingParams(
        max_new_tokens=6,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        ignore_eos=True,
        return_k_alternatives=3,
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
