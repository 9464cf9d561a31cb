"""``--quantization int8`` (weight-only int8) and ``fp8`` (e4m3) linears with per-output-channel
scales, on CPU (the fp8 kernels on CUDA: tests/kernels/test_triton_kernels.py).

The kernels against the dequantized reference; the default model's top-1 agreement with fp32
on a fixed text and its mean |delta logprob| (printed); LoRA on a quantized base against peft
on the dequantized base weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_lora
from modelharness import Harness

from truffula import config
from truffula.config import EngineConfig
from truffula.kernels import quant_fp8, quant_int4, quant_int8
from truffula.kernels.select import select_kernels
from truffula.layers import linear
from truffula.layers.linear import Linear, quantize_linears

CPU = select_kernels(torch.device("cpu"), torch.float32)
MODULES = {"int8": quant_int8, "fp8": quant_fp8}
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press. Within fifty "
    "years printers worked in more than two hundred European cities, and the price of books "
    "fell sharply. Scholars could compare identical copies of a text for the first time, "
    "which changed how knowledge was checked, corrected and shared across borders."
)


def round_trip(method: str, w: torch.Tensor) -> torch.Tensor:
    """The weight ``method`` computes with: quantized and dequantized."""
    if method == "int4":
        group = quant_int4.group_for(w.shape[1])
        assert group is not None
        return quant_int4.dequantize(quant_int4.quantize(w, group))
    quant = MODULES[method]
    return quant.dequantize(*quant.quantize(w))


def test_fp8_round_trip_and_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen)
    w[3] *= 50
    q, scale = quant_fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (96,)
    deq = quant_fp8.dequantize(q, scale)
    # e4m3: 3 mantissa bits, so half a step is 1/16 of the value; subnormals below 2^-6
    assert ((deq - w).abs() <= w.abs() / 16 + scale[:, None] * 2**-10).all()
    x = torch.randn(5, 64, generator=gen)
    b = torch.randn(96, generator=gen)
    want = F.linear(x, deq, b)
    assert torch.allclose(quant_fp8.linear_dequant(x, q, scale, b), want, atol=1e-4)
    assert torch.allclose(quant_fp8.reference(x, q, scale, b, False), want, atol=1e-4)
    xq, xs = quant_fp8.quantize_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (5, 1)
    assert (xq.float().abs().amax(dim=1) == quant_fp8.FP8_MAX).all()  # each row's absmax
    w8a8 = quant_fp8.reference(x, q, scale, b, True)
    assert 0 < (w8a8 - want).abs().max().item() < 0.1 * want.abs().max().item()


def test_quantize_round_trip_and_kernels() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen)
    w[3] *= 50  # per-channel scales: a large row does not coarsen the others
    x = torch.randn(5, 64, generator=gen)
    b = torch.randn(96, generator=gen)
    q, scale = quant_int8.quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    deq = quant_int8.dequantize(q, scale)
    assert ((deq - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    ref = F.linear(x, deq, b)
    assert torch.allclose(quant_int8.linear_dequant(x, q, scale, b), ref, atol=1e-5)
    if quant_int8.cpu_int8pack_available():
        got = quant_int8.linear_cpu(x[None], q, scale.to(torch.bfloat16), b)[0]
        assert got.dtype == torch.float32
        assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_linear_layer_keeps_its_quantized_weight_and_skips_packing(method: str) -> None:
    lin = Linear(64, 32, bias=True)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    dense = lin.weight.detach().clone()
    x = torch.randn(3, 64)
    want = F.linear(x, dense, lin.bias)
    lin.quantize(method, CPU)
    assert lin.weight.numel() == 0 and lin.qweight is not None
    kinds = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}
    assert lin.qweight.dtype == kinds[method]
    lin.pack_for_cpu()  # a no-op on a quantized layer
    assert lin.packed is None
    got = lin(x)
    assert (got - want).abs().max().item() < (0.2 if method == "int4" else 0.05) * want.abs().max()
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8, int4"):
        quantize_linears(lin, "nf4", CPU)
    assert linear.QUANTIZATIONS == config.QUANTIZATIONS  # the flag's choices are what is built
    with pytest.raises(ValueError, match="quantization must be int8 or fp8 or int4"):
        EngineConfig.from_kwargs(quantization="fp4")


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_default_model_quantized_agrees_with_fp32(model_dir: Path, method: str) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids
    ref = Harness(model_dir, block_size=16, num_blocks=16).step({"a": ids})["a"]
    h = Harness(model_dir, block_size=16, num_blocks=16)
    assert quantize_linears(h.runner.model, method, CPU) == 30 * 4  # qkv, o, gate_up, down

    got = h.step({"a": ids})["a"]
    assert torch.isfinite(got).all()
    nxt = torch.tensor(ids[1:])[:, None]
    agree = (got[:-1].argmax(-1) == ref[:-1].argmax(-1)).float().mean().item()
    dlp = (got[:-1].gather(1, nxt) - ref[:-1].gather(1, nxt)).abs().mean().item()
    print(f"{method} vs fp32 on {len(ids)} tokens: top-1 {agree:.3f}, mean |dlogprob| {dlp:.4f}")
    # int4: groups of 32 hold the weights exactly (they were the GGUF's Q4_1 32-blocks), so
    # only the bfloat16 activations of the CPU int4 matmul differ
    floor = {"int8": (0.95, 0.2), "fp8": (0.9, 0.4), "int4": (0.97, 0.05)}[method]
    assert agree >= floor[0]
    assert 0 < dlp < floor[1]


def test_default_model_int4_in_bfloat16_keeps_its_blocks(model_dir: Path) -> None:
    """Loaded in bfloat16, the default model's Q4_1 values are still recognised as 4-bit
    groups of 32: int4 then agrees with fp32 as well as the bfloat16 model does, not as a
    re-rounding to coarser groups would (65% top-1 in the fp32 test's measurement)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids
    ref = Harness(model_dir, block_size=16, num_blocks=16).step({"a": ids})["a"]
    bf16 = Harness(model_dir, block_size=16, num_blocks=16, dtype=torch.bfloat16)
    h = Harness(model_dir, block_size=16, num_blocks=16, dtype=torch.bfloat16, quantization="int4")
    assert {m.int4.group for m in h.runner.model.modules() if getattr(m, "int4", None)} == {32}

    def top1(h: Harness) -> float:
        got = h.step({"a": ids})["a"].float()
        return (got[:-1].argmax(-1) == ref[:-1].argmax(-1)).float().mean().item()

    plain, int4 = top1(bf16), top1(h)
    print(f"top-1 against fp32 over {len(ids)} tokens: bf16 {plain:.3f}, bf16 + int4 {int4:.3f}")
    assert int4 >= plain - 0.05


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_lora_on_quantized_base(tmp_path: Path, method: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from truffula.adapters.store import AdapterStore
    from truffula.layers.lora import apply_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    # the reference: peft on the base whose linears hold the dequantized weights
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "layers." in name:
                p.copy_(round_trip(method, p))
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    randomize_lora(model, 3)
    model.save_pretrained(tmp_path / "ad")
    ids = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        with model.disable_adapter():
            base = model(torch.tensor([ids])).logits[0].log_softmax(-1)

    h = Harness(folder, block_size=4)
    quantize_linears(h.runner.model, method, CPU)
    layers = apply_lora(h.runner.model, 2, 8, torch.float32, torch.device("cpu"))
    store = AdapterStore(layers, h.runner.model.packed_modules, 2, 8, str(tmp_path))
    slot = store.acquire(store.load("ad"))
    assert (
        next(iter(layers.values())).a.dtype == torch.float32
    )  # the factors stay in the engine dtype
    got = h.step({"a": ids}, {"a": slot})["a"]
    plain = h.step({"b": ids})["b"]
    assert torch.isfinite(got).all()
    bf16 = (method == "int8" and quant_int8.cpu_int8pack_available()) or (
        method == "int4" and quant_int4.cpu_int4pack_available()
    )
    tol = 2e-2 if bf16 else 1e-4  # int8 and int4 on CPU: bf16 activations
    assert (got - ref).abs().max().item() < tol
    assert (plain - base).abs().max().item() < tol
    assert (ref - base).abs().max().item() > 10 * tol  # the adapter matters
