"""The fused CPU decode (``models.decode_cpu``, ``kernels/csrc/decode_cpu.cpp``) against the
eager model and HF transformers: tiny random Llama-family models in float32 (dense, oneDNN-packed
and GQA, Qwen2's q/k/v biases), in bfloat16 with int4 or int8 weights, with adapters, in decode
steps, prompt chunks and verify-shaped chunks, and the default model through the engine with
alternatives and adapters (``tests/speculative`` compares n-gram speculation, whose verify steps
run here too, with plain decoding).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_greedy, hf_greedy, randomize_lora
from modelharness import Harness

from truffula.forward import forward_context
from truffula.kernels import decode_cpu
from truffula.scheduler.output import ScheduledSeq

from .test_architectures import NO_SPECIAL, SMALL, VOCAB, built, save_random

pytestmark = pytest.mark.skipif(not decode_cpu.available(), reason="no C++ toolchain here")

LLAMA = dict(intermediate_size=96, num_hidden_layers=3, num_key_value_heads=2, head_dim=16)
FITS = {
    "llama-gqa": ("LlamaConfig", LLAMA),
    "qwen2-bias": ("Qwen2Config", dict(LLAMA, num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(LLAMA, sliding_window=None)),
}


def _folder(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    cls, kw = FITS[name]
    folder = tmp_path_factory.mktemp(name)
    save_random(getattr(transformers, cls)(**{**SMALL, **NO_SPECIAL, **kw}), folder)
    return folder


@pytest.fixture(scope="module", params=list(FITS))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(request.param, tmp_path_factory)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _step_both(
    h: Harness, chunks: dict[str, list[int]], slots: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``chunks`` (each sequence's next tokens; with LoRA slot ``slots[rid]``),
    computed fused, then eager (which rewrites the same cache slots): both log-softmax rows,
    decodes first as the runner orders them."""
    fused = h.runner.fused_decode
    assert fused is not None
    seqs = []
    for rid, toks in chunks.items():
        start, blocks = h.pos.get(rid, 0), h.blocks.setdefault(rid, [])
        need = -(-(start + len(toks)) // h.block_size) - len(blocks)
        if need > 0:
            blocks += h.pool.allocate(need)
        slot = (slots or {}).get(rid, -1)
        seqs.append(ScheduledSeq(rid, toks, start, list(blocks), True, slot))
        h.pos[rid] = start + len(toks)
    seqs.sort(key=lambda q: q.num_tokens != 1)
    ids, positions, ctx = h.runner.prepare(seqs)
    with forward_context(ctx):
        got = fused(ids, ctx)
        want = h.runner.model(ids, positions)
    assert got is not None and got.shape == want.shape
    head = h.runner.model.compute_logits
    return head(got).log_softmax(-1), head(want).log_softmax(-1)


def _decode_all(
    h: Harness, tokens: dict[str, int], slots: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _step_both(h, {rid: [t] for rid, t in tokens.items()}, slots)


def _decode_both(h: Harness, rid: str, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _decode_all(h, {rid: token})


@pytest.mark.parametrize("pack", [False, True])
def test_fused_decode_equals_eager_in_float32(folder: Path, pack: bool) -> None:
    """A sequence alone (slots in order, read in place), then one whose blocks interleave with
    another's (gathered): every decode's log-softmax within 1e-5 of the eager model's."""
    h = Harness(folder, block_size=4, pack=pack)
    fused = h.runner.fused_decode
    assert fused is not None
    assert set(fused.kinds) == {decode_cpu.PACKED if pack else decode_cpu.DENSE}
    h.step({"a": _ids(9, 1)})
    for t in _ids(6, 2):
        got, want = _decode_both(h, "a", t)
        assert (got - want).abs().max().item() < 1e-5
    h.step({"b": _ids(3, 3)})  # b's block lies between a's
    for t in _ids(6, 4):
        for rid in ("b", "a"):
            got, want = _decode_both(h, rid, t)
            assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_fused_decode_in_bfloat16_with_quantized_weights(folder: Path, quantization: str) -> None:
    """bfloat16 activations and int4 or int8 weights: the same roundings as the eager model, so
    the rows agree to a few bfloat16 units (the norms' sums run in another order)."""
    h = Harness(folder, block_size=4, dtype=torch.bfloat16, quantization=quantization)
    fused = h.runner.fused_decode
    kind = decode_cpu.INT4 if quantization == "int4" else decode_cpu.INT8
    assert fused is not None and set(fused.kinds) == {kind}
    h.step({"a": _ids(9, 1)})
    for t in _ids(8, 2):
        got, want = _decode_both(h, "a", t)
        assert (got - want).abs().max().item() < 0.05
        assert int(got.argmax()) == int(want.argmax())


def test_engine_greedy_through_fused_decode_matches_hf(folder: Path, model_dir: Path) -> None:
    """The engine (one request: every decode step fused) against HF ``generate``."""
    from transformers import AutoModelForCausalLM

    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    for name in ("tokenizer.json", "tokenizer_config.json"):  # ids only; any tokenizer loads
        shutil.copy(model_dir / name, folder / name)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(str(folder), progress=False, max_model_len=128)
    assert llm.engine.runner.fused_decode is not None
    prompt = _ids(12, 5)
    ref, margins = hf_greedy(hf, prompt, 10)
    out = llm.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert_same_greedy(out[0].token_ids, ref, margins)


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "phi3-window", "mistral-window", "gpt2"])
def test_models_it_does_not_fit_run_eager(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, folder = built(name, tmp_path_factory)
    assert Harness(folder, block_size=4).runner.fused_decode is None


def test_decode_steps_of_several_sequences(folder: Path) -> None:
    """Three sequences of different lengths decoding together (gathered, masked): each row
    within 1e-5 of the eager model's."""
    h = Harness(folder, block_size=4)
    h.step({"a": _ids(9, 1), "b": _ids(3, 2), "c": _ids(14, 3)})
    for t in _ids(5, 4):
        got, want = _decode_all(h, {"a": t, "b": t + 1, "c": t + 2})
        assert got.shape[0] == 3 and (got - want).abs().max().item() < 1e-5


def test_adapters_in_the_step(folder: Path, tmp_path: Path) -> None:
    """A random peft adapter on q/v/o/down (not every projection) beside the base model, two
    adapter sequences and one base in a step, then the adapter alone: within 1e-5 of the eager
    model's gathered LoRA; a and b share their tokens, so their rows differ by the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from truffula.adapters.store import AdapterStore
    from truffula.layers.lora import apply_lora

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(hf, cfg)
    randomize_lora(model, 3)
    model.save_pretrained(tmp_path / "ad")
    h = Harness(folder, block_size=4)
    layers = apply_lora(h.runner.model, 2, 8, torch.float32, torch.device("cpu"))
    store = AdapterStore(layers, h.runner.model.packed_modules, 2, 8, str(tmp_path))
    slot = store.acquire(store.load("ad"))
    slots = {"a": slot, "c": slot}
    h.step({"a": _ids(9, 1), "b": _ids(9, 1), "c": _ids(5, 3)}, slots)
    for t in _ids(4, 4):
        got, want = _decode_all(h, {"a": t, "b": t, "c": t}, slots)
        assert (got - want).abs().max().item() < 1e-5
    assert (got[0] - got[1]).abs().max().item() > 1e-2
    for t in _ids(3, 5):
        got, want = _decode_all(h, {"a": t}, slots)
        assert (got - want).abs().max().item() < 1e-5


def test_steps_with_prompt_and_verify_chunks(folder: Path) -> None:
    """Whole prompts, a chunk after cached tokens beside decodes, and five-token chunks of
    running sequences (a speculative verify step's shape): every row within 1e-5 of the eager
    model's, in float32 and within 0.05 in bfloat16 with int4 weights."""
    for dtype, quantization, tol in ((torch.float32, None, 1e-5), (torch.bfloat16, "int4", 0.05)):
        h = Harness(folder, block_size=4, dtype=dtype, quantization=quantization)
        got, want = _step_both(h, {"a": _ids(7, 1), "b": _ids(3, 2)})
        assert got.shape[0] == 10 and (got - want).abs().max().item() < tol
        got, want = _step_both(h, {"a": _ids(1, 3), "b": _ids(6, 4), "c": _ids(5, 5)})
        assert got.shape[0] == 12 and (got - want).abs().max().item() < tol
        got, want = _step_both(h, {"a": _ids(5, 6), "b": _ids(1, 7), "c": _ids(5, 8)})
        assert (got - want).abs().max().item() < tol


@pytest.mark.slow
def test_default_model_records_equal_eager(llm: Any) -> None:
    """The default model through the engine, k = 5: tokens, ranks and alternatives the same,
    logprobs within 1e-4, with the fused decode and without it."""
    from truffula.sampling.params import SamplingParams

    runner = llm.engine.runner
    fused = runner.fused_decode
    assert fused is not None
    p = SamplingParams(
        max_new_tokens=24, temperature=0, details=True, return_k_alternatives=5, ignore_eos=True
    )
    prompts = ["The capital of France is", "def fibonacci(n):"]
    got = llm.generate(prompts, p)  # two prompts in one batch: decodes of two, then of one
    got += llm.generate(prompts[:1], p)
    try:
        runner.fused_decode = None
        want = llm.generate(prompts, p) + llm.generate(prompts[:1], p)
    finally:
        runner.fused_decode = fused
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.tokens, w.tokens, strict=True):
            assert a.rank == b.rank and abs(a.logprob - b.logprob) < 1e-4
            assert a.alternatives is not None and b.alternatives is not None
            assert [x.id for x in a.alternatives] == [x.id for x in b.alternatives]
            for x, y in zip(a.alternatives, b.alternatives, strict=True):
                assert abs(x.logprob - y.logprob) < 1e-4


@pytest.mark.slow
def test_default_model_with_adapters_equal_eager(model_dir: Path) -> None:
    """The example adapters beside the base model in one batch, then one alone: the same tokens
    and ranks, logprobs within 1e-4, fused and eager."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    root = Path(__file__).resolve().parents[2] / "examples" / "adapters"
    llm = LLM(str(model_dir), progress=False, adapter_root=str(root), max_model_len=512)
    runner = llm.engine.runner
    fused = runner.fused_decode
    assert fused is not None

    p = [
        SamplingParams(max_new_tokens=16, temperature=0, details=True, adapter_id=a)
        for a in (None, "pirate", "caps")
    ]
    first = _generate_each(llm, p) + _generate_each(llm, p[1:2])
    try:
        runner.fused_decode = None
        second = _generate_each(llm, p) + _generate_each(llm, p[1:2])
    finally:
        runner.fused_decode = fused
    assert fused.lora is not None and any(w is not None for w in fused.lora)
    for g, w in zip(first, second, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.tokens, w.tokens, strict=True):
            assert a.rank == b.rank and abs(a.logprob - b.logprob) < 1e-4
    assert first[0].token_ids != first[2].token_ids  # the adapters matter


def _generate_each(llm: Any, params: list[Any]) -> list[Any]:
    """One batch: the same prompt under each of ``params``."""
    return llm.generate(["Tell me about the sea."] * len(params), params)


def test_switched_off_by_the_environment() -> None:
    import os
    import subprocess
    import sys

    code = "from truffula.kernels import decode_cpu; print(decode_cpu.available())"
    env = dict(os.environ, TRUFFULA_FUSED_CPU_DECODE="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
