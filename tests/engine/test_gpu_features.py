"""Serving features on CUDA against their references: speculative decoding (prompt lookup and a
draft model in CUDA graphs) equal to plain decoding, and ``--quantization fp8`` against
transformers on the same fp8 weights, ``--quantization int4`` against transformers on the same
dequantized int4 weights. Tiny random-weight models (``engine.gpu_models``);
skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.gpu_models import PROMPTS, TEXTS, cuda_logsoftmax, hf
from truffula.engine.output import TokenInfo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_speculative_decoding_on_cuda_equals_plain_decoding(tiny: Path) -> None:
    """Prompt-lookup drafts verified on CUDA (the verify steps replay mixed-step graphs): the
    same greedy tokens and logprobs as plain decoding, fp32."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    cfg = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    spec = LLM(str(tiny), progress=False, device="cuda", dtype="float32", speculative=cfg)
    p = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, return_k_alternatives=3)
    prompts = [t + " " + t for t in PROMPTS]  # repeated text: lookups find matches
    with_spec = spec.generate(prompts, p)
    plain = spec.generate(prompts, p.with_updates(speculative=False))
    assert spec.engine.drafter.drafted > 0
    for a, b in zip(plain, with_spec, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
            assert [t.id for t in x.alternatives] == [t.id for t in y.alternatives]


def fp8_reference(folder: Path):  # type: ignore[no-untyped-def]
    """HF transformers in fp32 computing what ``--quantization fp8`` computes: each decoder
    projection holds its dequantized fp8 weight and quantizes the input rows of the first
    ``act[0]`` positions to fp8, each by its absmax (W8A8; the later positions: weight-only);
    returns (model, act)."""
    from truffula.kernels import quant_fp8

    model = hf(folder, torch.float32)
    act = [0]

    def quantize_input(_module, args):  # type: ignore[no-untyped-def]
        x = args[0].clone()  # [1, positions, features]
        rows = x[0, : act[0]]
        q, s = quant_fp8.quantize_rows(rows)
        x[0, : act[0]] = q.float() * s
        return (x,)

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(quant_fp8.dequantize(*quant_fp8.quantize(m.weight)))
                m.register_forward_pre_hook(quantize_input)
    return model, act


Compared = tuple[list[float], list[tuple[TokenInfo, torch.Tensor]]]


def quantized_against(
    folder: Path,
    dtype: str,
    quantization: str,
    ref_model,  # type: ignore[no-untyped-def]
    k: int,
    act: list[int] | None = None,
) -> Compared:
    """The engine with ``--quantization`` (decode graphs) on one long prompt alone, then with
    the four short ones, beside ``ref_model``'s log-softmax: |Δ logprob| of every prompt and
    generated position, and (token record, reference row) of every generated token.
    ``act``: set, per request, to the positions the reference quantizes as the engine's steps
    do (fp8's W8A8: a prompt alone; everything when five requests decode together)."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(
        str(folder),
        progress=False,
        device="cuda",
        dtype=dtype,
        quantization=quantization,
        kv_cache_memory="256MiB",
    )
    p = SamplingParams(
        max_new_tokens=10,
        temperature=0,
        ignore_eos=True,
        decoder_input_details=True,
        return_k_alternatives=k,
    )
    text = " ".join(TEXTS[:3])
    diffs: list[float] = []
    tokens: list[tuple[TokenInfo, torch.Tensor]] = []
    for prompts in ([text], [text, *PROMPTS]):
        for out in llm.generate(prompts, p):
            ids = out.prompt_token_ids + out.token_ids
            n = len(out.prompt_token_ids)
            if act is not None:
                act[0] = n if len(prompts) == 1 else len(ids)
            with torch.no_grad():
                ref = cuda_logsoftmax(ref_model, ids)
            diffs += [
                abs(out.prompt_tokens[pos].logprob - ref[pos - 1, ids[pos]].item())
                for pos in range(1, n)
            ]
            for i, t in enumerate(out.tokens):
                row = ref[n - 1 + i]
                diffs.append(abs(t.logprob - row[t.id].item()))
                tokens.append((t, row))
    return diffs, tokens


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs fp8 (compute capability 8.9+)",
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_on_cuda_follows_its_reference(tiny: Path, dtype: str) -> None:
    """``--quantization fp8`` with decode graphs against HF fp32 with the same fp8 weights and
    the same activation scheme position by position: W8A8 (per-token scales) for the prompt
    (prefill) and for five requests decoding together, weight-only (the fp8 GEMV) for the
    tokens one request decodes alone.

    Not within float32 tolerance, and not because of the engine: Hopper's fp8 tensor cores
    accumulate with about 14 bits of mantissa (``_scaled_mm`` differs from exact float32 sums
    of the same fp8 products by ~1e-4 relative, even with unit scales), and that much noise
    moves the next layer's activations across fp8 rounding boundaries (steps 6% apart); a
    random tiny model amplifies it to a few hundredths of a logprob on average. The same
    scheme emulated on CPU matches this reference within 2e-6. The bounds below catch wrong
    scales, layouts or schemes (errors of whole units), while the kernels are held to their
    references in tests/kernels/test_triton_kernels.py."""
    ref_model, act = fp8_reference(tiny)
    diffs, tokens = quantized_against(tiny, dtype, "fp8", ref_model, 1, act)
    agree = [t.id == row.argmax().item() for t, row in tokens]
    mean = sum(diffs) / len(diffs)
    print(
        f"fp8 {dtype}: mean |dlogprob| {mean:.4f}, max {max(diffs):.4f}, argmax {sum(agree)}/{len(agree)}"
    )
    # measured on an H200: float32 0.036 / 0.16, bfloat16 0.073-0.086 / 0.25-0.39; argmax
    # 53-59 of 60
    bound = (0.08, 0.4) if dtype == "float32" else (0.15, 0.6)
    assert mean < bound[0] and max(diffs) < bound[1]
    assert sum(agree) >= 0.75 * len(agree)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_on_cuda_follows_its_reference(tiny: Path, dtype: str) -> None:
    """``--quantization int4`` (the Triton GEMV for one request decoding, the dequantizing
    GEMM for prefill and for five requests decoding together, in decode graphs) against HF
    fp32 holding the same dequantized weights: weight-only, so in float32 the logprobs agree
    to float32 rounding and every token is the reference's argmax; in bfloat16 within the
    bounds of 16-bit activations."""
    from truffula.kernels import quant_int4

    ref_model = hf(tiny, torch.float32)
    with torch.no_grad():
        for name, m in ref_model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                w4 = quant_int4.quantize_best(m.weight)
                assert w4 is not None
                m.weight.copy_(quant_int4.dequantize(w4))
    diffs, tokens = quantized_against(tiny, dtype, "int4", ref_model, 3)
    if dtype == "float32":
        for t, row in tokens:
            assert t.id == row.argmax().item()
            want = row.topk(3).indices.tolist()
            assert [a.id for a in t.alternatives or ()] == want
    mean = sum(diffs) / len(diffs)
    print(f"int4 {dtype}: mean |dlogprob| {mean:.5f}, max {max(diffs):.5f}")
    # bfloat16, measured on an H200: mean 0.065-0.097, max 0.31 (16-bit activations over a
    # 40-token prompt of a random model; float32 holds the kernels to the reference)
    bound = (1e-4, 1e-3) if dtype == "float32" else (0.15, 0.6)
    assert mean < bound[0] and max(diffs) < bound[1]


def test_a_draft_model_in_cuda_graphs_drafts_what_the_target_decodes(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model drafting for itself on CUDA, its steps replayed from CUDA graphs (captured
    again each time its cache grows from 2 blocks): the same greedy tokens and logprobs as
    plain decoding, and nearly every draft accepted (a graph reading a stale cache would
    draft garbage)."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams
    from truffula.speculative import draft_cache

    monkeypatch.setattr(draft_cache, "FIRST_BLOCKS", 2)
    cfg = f'{{"method": "draft_model", "model": "{tiny}", "num_speculative_tokens": 4}}'
    spec = LLM(
        str(tiny),
        progress=False,
        device="cuda",
        dtype="float32",
        speculative=cfg,
        kv_cache_memory="256MiB",
    )
    drafter = spec.engine.drafter
    assert drafter is not None and drafter.model is not None
    assert drafter.model.graphs is not None
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, return_k_alternatives=3)
    with_spec = spec.generate(PROMPTS, p)
    plain = spec.generate(PROMPTS, p.with_updates(speculative=False))
    graphs = drafter.model.graphs
    assert graphs is not None and graphs.graphs and graphs.mixed  # decode and catch-up replays
    assert drafter.model.cache.num_blocks > 2
    assert drafter.drafted > 0 and drafter.accepted >= 0.9 * drafter.drafted
    for a, b in zip(plain, with_spec, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
            assert [t.id for t in x.alternatives] == [t.id for t in y.alternatives]
