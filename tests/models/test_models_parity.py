"""Native models against HF transformers on the same weights: log-softmax within 1e-4 (fp32).

These run the reference kernels (F.linear, torch attention); the oneDNN-packed linears of the
CPU fast path are checked against that reference at the end of this file.

Tiny random-weight configs are built from transformers' own config classes, initialised by
transformers, saved as safetensors and loaded by truffula's loader. Sequences run through the
paged cache in uneven chunks, mixed with other sequences in the same step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import hf_logsoftmax
from modelharness import Harness

TOL = 1e-4


def tiny_llama(**extra):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    base.update(extra)
    return LlamaConfig(**base)


def tiny_qwen2():  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def tiny_mistral():  # type: ignore[no-untyped-def]
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=300,
        max_position_embeddings=256,
        sliding_window=None,
    )


CONFIGS = {
    "llama": lambda: tiny_llama(),
    "llama3-rope": lambda: tiny_llama(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        max_position_embeddings=256,
    ),
    "llama-linear-rope": lambda: tiny_llama(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    ),
    "llama-bias-headdim": lambda: tiny_llama(attention_bias=True, mlp_bias=True, head_dim=32),
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
}


def save_random(config, folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init so logits are not flat
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_random_model_matches_hf(name: str, tmp_path: Path) -> None:
    hf = save_random(CONFIGS[name](), tmp_path)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 300, (23,), generator=gen).tolist()
    b = torch.randint(0, 300, (9,), generator=gen).tolist()
    ref_a, ref_b = hf_logsoftmax(hf, a), hf_logsoftmax(hf, b)
    h = Harness(tmp_path, block_size=4)
    got_a = [h.step({"a": a[:13]})["a"]]  # prefill chunk
    out = h.step({"a": a[13:16], "b": b[:9]})  # second chunk of a beside a whole prompt b
    got_a.append(out["a"])
    got_b = [out["b"]]
    for t in range(16, 23):  # decodes of a, with b decoding beside it for a while
        chunk = {"a": [a[t]]}
        if t < 20:
            chunk["b"] = [t]
        out = h.step(chunk)
        got_a.append(out["a"])
    assert (torch.cat(got_a) - ref_a).abs().max().item() <= TOL
    assert (got_b[0] - ref_b).abs().max().item() <= TOL
    # b's decode steps ran in the mixed batch; one more decode, checked against HF
    ref_b2 = hf_logsoftmax(hf, [*b, 16, 17, 18, 19, 20])
    assert (h.step({"b": [20]})["b"][0] - ref_b2[-1]).abs().max().item() <= TOL


def test_default_model_prefill_and_decode_match_hf(model_dir, hf_model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a fruit that is yellow."}], add_generation_prompt=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = hf_logsoftmax(hf_model, [*ids, 504, 2134, 314])
    h = Harness(model_dir, block_size=16, num_blocks=16)
    got = [h.step({"x": ids})["x"]]
    for t in (504, 2134, 314):
        got.append(h.step({"x": [t]})["x"])
    diff = (torch.cat(got) - ref).abs().max().item()
    assert diff <= TOL, diff


def test_packed_cpu_linears_match_the_reference_path(model_dir, hf_model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The fast path differs from the reference only by fp32 summation order: top-20 logprobs
    within 1e-4 of HF, the whole vocabulary (tails near -30 included) within 3e-4."""
    from truffula.kernels import linear_cpu

    if not linear_cpu.available(torch.float32):
        pytest.skip("oneDNN packed linears are not available on this CPU")
    ids = hf_tokenizer.encode("The weather today is sunny, and the children are playing in the")
    ref = hf_logsoftmax(hf_model, ids)
    h = Harness(model_dir, block_size=16, num_blocks=16, pack=True)
    assert h.runner.packed_linears
    got = torch.cat(
        [h.step({"x": ids[:-2]})["x"], h.step({"x": ids[-2:-1]})["x"], h.step({"x": ids[-1:]})["x"]]
    )
    top = ref.topk(20, dim=-1).indices
    assert (got.gather(1, top) - ref.gather(1, top)).abs().max().item() <= 1e-4
    assert (got - ref).abs().max().item() <= 3e-4


@pytest.mark.parametrize("m", [1, 3, 8, 64])
@pytest.mark.parametrize("shape", [(96, 64), (300, 64), (64, 160)])
def test_packed_linear_kernel_matches_f_linear(m: int, shape: tuple[int, int]) -> None:
    from truffula.kernels import linear_cpu

    if not linear_cpu.available(torch.float32):
        pytest.skip("oneDNN packed linears are not available on this CPU")
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(*shape, generator=gen)
    b = torch.randn(shape[0], generator=gen)
    x = torch.randn(m, shape[1], generator=gen)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = linear_cpu.linear(x, linear_cpu.pack(w), b).double()
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    # rows do not depend on how many other rows share the call (batch invariance)
    assert torch.equal(
        linear_cpu.linear(x[:1], linear_cpu.pack(w), b)[0],
        linear_cpu.linear(x, linear_cpu.pack(w), b)[0],
    )
