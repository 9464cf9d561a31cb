"""Pre-quantized checkpoints (GPTQ, AWQ, FP8) load dequantized and match transformers' model on
the dequantized weights.

Each linear of a tiny random Llama is quantized here, and its checkpoint tensors are packed
the way the formats' own tools pack them: the loops follow AutoGPTQ's ``QuantLinear.pack``
(rows packed low bits first, zeros stored minus one) and AutoAWQ's ``WQLinear_GEMM.from_linear``
(columns in the order 0, 2, 4, 6, 1, 3, 5, 7), word by word. The dense weights the reference
model gets are computed from the integers before packing, so the loader's unpacking is checked
against them, not against itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import hf_logsoftmax
from modelharness import Harness
from safetensors.torch import load_file, save_file

from truffula.errors import ModelLoadError
from truffula.models.registry import load_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 32
IDS = [3, 17, 250, 41, 9, 99, 120, 7, 64, 5, 200, 13]


def _tiny(tmp: Path) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _int_quantize(w: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric per-group (along the input) quantization: q [out, in], zeros and scales
    [groups, out]."""
    out, inp = w.shape
    g = w.reshape(out, inp // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-6)
    zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 2**bits - 1)
    return (
        q.reshape(out, inp).to(torch.int64).numpy(),
        zero.t().contiguous().to(torch.int64).numpy(),
        scale.t().contiguous().half().float().numpy(),
    )


def _dense(q: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    g = np.arange(q.shape[1]) // GROUP
    return torch.from_numpy((q - zeros[g].T) * scales[g].T).float()


def _gptq_pack(q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int) -> dict:
    intweight = q.T.astype(np.uint32)  # [in, out]
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i, row = 0, 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += per
        row += 1
    z = (zeros - 1).astype(np.uint32) & ((1 << bits) - 1)  # AutoGPTQ stores zero - 1
    qzeros = np.zeros((z.shape[0], z.shape[1] // 32 * bits), dtype=np.uint32)
    i, col = 0, 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= z[:, j] << (bits * (j - i))
        i += per
        col += 1
    return {
        ".qweight": torch.from_numpy(qweight.view(np.int32)),
        ".qzeros": torch.from_numpy(qzeros.view(np.int32)),
        ".scales": torch.from_numpy(scales).half(),
        ".g_idx": torch.arange(q.shape[1], dtype=torch.int32) // GROUP,
    }


def _awq_pack(q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int) -> dict:
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight = q.T.astype(np.uint32)  # [in, out]
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    z = zeros.astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 8), dtype=np.uint32)
    for col in range(z.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= z[:, col * 8 + order_map[i]] << (i * 4)
    return {
        ".qweight": torch.from_numpy(qweight.view(np.int32)),
        ".qzeros": torch.from_numpy(qzeros.view(np.int32)),
        ".scales": torch.from_numpy(scales).half(),
    }


def _fp8(w: torch.Tensor, per_channel: bool) -> tuple[dict, torch.Tensor]:
    amax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (w / scale).to(torch.float8_e4m3fn)
    return {".weight": q, ".weight_scale": scale, ".input_scale": torch.ones(1)}, q.float() * scale


def _write(
    tmp: Path,
    quantize: Callable[[torch.Tensor], tuple[dict, torch.Tensor]],
    qconfig: dict,
) -> tuple[Path, object]:
    """The quantized checkpoint in ``tmp/q`` and the transformers model on its dense weights."""
    model = _tiny(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, w in list(state.items()):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
            parts, dense = quantize(w)
            tensors |= {module + suffix: t for suffix, t in parts.items()}
            state[name] = dense
        else:
            tensors[name] = w
    model.load_state_dict(state)
    folder = tmp / "q"
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"architectures": ["LlamaForCausalLM"], "quantization_config": qconfig}
    (folder / "config.json").write_text(json.dumps(config))
    half = len(tensors) // 2  # two shards: a module's parts may sit in either
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:half]}, str(folder / "model-1.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(folder / "model-2.safetensors"))
    return folder, model


def _ints(pack: Callable, bits: int) -> Callable[[torch.Tensor], tuple[dict, torch.Tensor]]:
    def quantize(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        q, z, s = _int_quantize(w, bits)
        return pack(q, z, s, bits), _dense(q, z, s)

    return quantize


CASES: dict[str, tuple[Callable[[torch.Tensor], tuple[dict, torch.Tensor]], dict]] = {
    "gptq-4bit": (_ints(_gptq_pack, 4), {"quant_method": "gptq", "bits": 4, "group_size": GROUP}),
    "gptq-8bit": (_ints(_gptq_pack, 8), {"quant_method": "gptq", "bits": 8, "group_size": GROUP}),
    "awq-4bit": (
        _ints(_awq_pack, 4),
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm"},
    ),
    "fp8-channel": (
        lambda w: _fp8(w, True),
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
    ),
    "fp8-tensor": (
        lambda w: _fp8(w, False),
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prequantized_checkpoint_matches_transformers_on_its_dense_weights(
    case: str, tmp_path: Path
) -> None:
    quantize, qconfig = CASES[case]
    folder, hf = _write(tmp_path, quantize, qconfig)
    with torch.no_grad():
        want = hf_logsoftmax(hf, IDS)
    got = Harness(folder).step({"a": IDS})["a"]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_fp8_blocks(tmp_path: Path) -> None:
    """transformers' fine-grained FP8: one scale per 32 x 32 block (``weight_scale_inv``)."""

    def quantize(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        rows, cols = -(-w.shape[0] // 32), -(-w.shape[1] // 32)
        scale = torch.rand(rows, cols) * 0.01 + 0.001
        full = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)[: w.shape[0], : w.shape[1]]
        q = (w / full).to(torch.float8_e4m3fn)
        return {".weight": q, ".weight_scale_inv": scale}, q.float() * full

    qconfig = {"quant_method": "fp8", "weight_block_size": [32, 32]}
    folder, hf = _write(tmp_path, quantize, qconfig)
    with torch.no_grad():
        want = hf_logsoftmax(hf, IDS)
    assert torch.allclose(Harness(folder).step({"a": IDS})["a"], want, atol=1e-4)


@pytest.mark.parametrize(
    ("qconfig", "message"),
    [
        ({"quant_method": "bitsandbytes"}, "quantization 'bitsandbytes' is not read"),
        ({"quant_method": "gptq", "bits": 3, "group_size": GROUP}, "gptq with 3 bits"),
        ({"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemv"}, "AWQ version"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "pack-quantized"),
    ],
)
def test_unknown_quantization_is_one_clear_error(
    qconfig: dict, message: str, tmp_path: Path
) -> None:
    folder, _ = _write(tmp_path, _ints(_gptq_pack, 4), qconfig)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model(folder, torch.float32, torch.device("cpu"), 64)
    assert str(folder) in str(err.value)


def test_a_missing_part_names_the_tensor(tmp_path: Path) -> None:
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": GROUP}
    folder, _ = _write(tmp_path, _ints(_gptq_pack, 4), qconfig)
    from safetensors.torch import load_file

    shard = folder / "model-1.safetensors"
    tensors = load_file(str(shard))
    victim = next(n for n in tensors if n.endswith(".scales"))
    del tensors[victim]
    save_file(tensors, str(shard))
    with pytest.raises(ModelLoadError, match=victim.replace(".", r"\.")):
        load_model(folder, torch.float32, torch.device("cpu"), 64)


def test_an_fp8_channel_checkpoint_keeps_its_own_fp8_values(tmp_path: Path) -> None:
    """An FP8 checkpoint with per-output-channel scales (llm-compressor's FP8 weights), served
    with ``--quantization fp8``: quantizing its dequantized weights per channel again gives
    back the checkpoint's own e4m3 bytes (each row's absmax is 448 times its scale), so the
    engine runs the checkpoint's values, not a second rounding of them."""
    from safetensors.torch import load_file

    from truffula.kernels.select import select_kernels
    from truffula.layers.linear import quantize_linears

    folder, _ = _write(tmp_path, lambda w: _fp8(w, True), CASES["fp8-channel"][1])
    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored |= load_file(str(shard))
    h = Harness(folder)
    model = h.runner.model
    quantize_linears(model, "fp8", select_kernels(torch.device("cpu"), torch.float32))
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    pre = "model.layers.1."
    checks = {
        attn.qkv_proj: [pre + f"self_attn.{p}_proj" for p in "qkv"],
        attn.o_proj: [pre + "self_attn.o_proj"],
        mlp.gate_up_proj: [pre + "mlp.gate_proj", pre + "mlp.up_proj"],
        mlp.down_proj: [pre + "mlp.down_proj"],
    }
    for layer, names in checks.items():
        want = torch.cat([stored[n + ".weight"] for n in names])
        scales = torch.cat([stored[n + ".weight_scale"].reshape(-1) for n in names])
        assert torch.equal(layer.qweight.view(torch.uint8), want.view(torch.uint8))
        assert torch.allclose(layer.qscale, scales, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["gptq-4bit", "awq-4bit"])
def test_a_4bit_checkpoint_keeps_its_own_grid_with_int4(case: str, tmp_path: Path) -> None:
    """A 4-bit GPTQ or AWQ checkpoint served with ``--quantization int4``: every linear holds
    the checkpoint's own scales (its fp16 values, not a new rounding's) and integers (its
    weight dequantizes to exactly the dense weights transformers gets), in the checkpoint's
    group size; the engine's outputs stay those of the dense weights."""
    from truffula.kernels import quant_int4

    pack, qconfig = (_gptq_pack if case == "gptq-4bit" else _awq_pack), CASES[case][1]

    def narrow(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        # integers in 0..7 only: no group spans the grid, so no rounding of the dense weights
        # to a new grid of min..max could find the checkpoint's scales
        q, z, s = _int_quantize(w, 4)
        q, z = q // 2, z // 2
        return pack(q, z, s, 4), _dense(q, z, s)

    folder, hf = _write(tmp_path, narrow, qconfig)
    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored |= load_file(str(shard))
    h = Harness(folder, quantization="int4")  # the runner quantizes, then drops the grids
    model = h.runner.model
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    hf_layer = hf.model.layers[1]  # type: ignore[attr-defined]
    checks = {
        attn.qkv_proj: [f"self_attn.{p}_proj" for p in "qkv"],
        attn.o_proj: ["self_attn.o_proj"],
        mlp.gate_up_proj: ["mlp.gate_proj", "mlp.up_proj"],
        mlp.down_proj: ["mlp.down_proj"],
    }
    for layer, names in checks.items():
        w4 = layer.int4
        assert w4 is not None and w4.group == GROUP and not layer.int4_grids
        scales = torch.cat([stored[f"model.layers.1.{n}.scales"].float().t() for n in names])
        assert torch.equal(w4.scale, scales)
        dense = torch.cat([hf_layer.get_submodule(n).weight for n in names])
        assert torch.allclose(quant_int4.dequantize(w4), dense, atol=1e-6, rtol=0)
    with torch.no_grad():
        want = hf_logsoftmax(hf, IDS)
    got = h.step({"b": IDS})["b"]
    tol = 2e-2 if quant_int4.cpu_int4pack_available() else 1e-4  # bfloat16 activations
    assert (got - want).abs().max().item() < tol
