"""int4 weights (``kernels.quant_int4``): the layout round-trips, round-to-nearest error is
within half a step of each group, torch's CPU int4 matmul and the Triton GEMV and GEMM
(CUDA, or ``TRITON_INTERPRET=1`` on the CPU) against the float32 reference."""

from __future__ import annotations

import os

import pytest
import torch

from truffula.kernels import quant_int4 as q4
from truffula.kernels import triton_support

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON = triton_support.AVAILABLE and (torch.cuda.is_available() or INTERPRET)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def weight(n_out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    w[3] *= 30  # groups of very different ranges
    w[:, 5] += 0.2  # and groups not centred on zero
    return w


def test_pack_round_trip_and_rtn_error() -> None:
    q = torch.randint(0, 16, (6, 256), generator=torch.Generator().manual_seed(1))
    assert torch.equal(q4.unpack(q4.pack(q)).long(), q)
    w = weight(40, 384)
    iw = q4.quantize(w)
    assert iw.packed.shape == (40, 192) and iw.scale.shape == (40, 3)
    err = (q4.dequantize(iw) - w).abs().reshape(40, 3, 128)
    assert (err <= iw.scale[..., None] / 2 + 1e-6).all()
    # a group's extremes are represented exactly (up to float rounding)
    grouped = w.reshape(40, 3, 128)
    back = q4.dequantize(iw).reshape(40, 3, 128)
    assert torch.allclose(back.amin(2), grouped.amin(2), atol=1e-5)
    assert torch.allclose(back.amax(2), grouped.amax(2), atol=1e-5)


def test_group_choice() -> None:
    """Groups of 32 when they hold the weight exactly (it was made of 4-bit 32-blocks), else
    the largest group dividing the width; none for a width no group divides."""
    w = weight(16, 256)
    assert q4.quantize_best(w).group == 128  # type: ignore[union-attr]
    blocky = q4.dequantize(q4.quantize(w, 32))
    chosen = q4.quantize_best(blocky)
    assert chosen is not None and chosen.group == 32
    assert torch.allclose(q4.dequantize(chosen), blocky, atol=1e-6)
    assert q4.quantize_best(weight(16, 192)).group == 64  # type: ignore[union-attr]
    assert q4.quantize_best(weight(16, 100)) is None
    # the same 4-bit values rounded to bfloat16 (a model loaded in 16 bits): still groups of
    # 32, within that rounding; plain bfloat16 weights are not taken for 4-bit ones
    chosen16 = q4.quantize_best(blocky.to(torch.bfloat16))
    assert chosen16 is not None and chosen16.group == 32
    assert (q4.dequantize(chosen16) - blocky).abs().max() <= blocky.abs().max() * 2**-7
    assert q4.quantize_best(w.to(torch.bfloat16)).group == 128  # type: ignore[union-attr]


def test_from_integers_is_the_checkpoint_formula() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (8, 256), generator=g)
    scale = torch.rand(8, 2, generator=g) * 0.1
    zero = torch.randint(0, 16, (8, 2), generator=g).float()
    want = (q.float().reshape(8, 2, 128) - zero[..., None]) * scale[..., None]
    got = q4.dequantize(q4.from_integers(q, scale, zero, 128))
    assert torch.allclose(got, want.reshape(8, 256), atol=1e-6)


@pytest.mark.skipif(not q4.cpu_int4pack_available(), reason="no CPU int4 matmul in this torch")
@pytest.mark.parametrize("rows", [1, 5])
def test_cpu_int4pack_against_reference(rows: int) -> None:
    iw = q4.quantize(weight(64, 512))
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3))
    b = torch.randn(64)
    got = q4.linear_cpu(x, q4.to_cpu_layout(iw), b)
    assert rel(got, q4.reference(x, iw, b)) < 1e-2  # bfloat16 activations


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON, reason="needs CUDA (or TRITON_INTERPRET=1) and triton")
@pytest.mark.parametrize(
    ("rows", "n_out", "n_in", "bias", "group"),
    [
        (1, 44, 256, False, 128),  # 2 groups a step
        (1, 72, 384, True, 128),  # 1
        (1, 40, 512, True, 128),  # 4
        (1, 40, 576, False, 32),  # the default model's width and groups
        (3, 40, 256, True, 128),  # the GEMM
        (20, 72, 128, False, 128),
        (5, 40, 576, True, 32),
        (33, 24, 320, False, 64),
        (130, 40, 256, True, 128),  # dequantized whole, then a matmul
        (128, 24, 576, False, 32),
    ],
)
def test_triton_int4_linear(rows: int, n_out: int, n_in: int, bias: bool, group: int) -> None:
    from truffula.kernels import quant_int4_triton

    iw = q4.quantize(weight(n_out, n_in, seed=rows), group)
    dev = q4.Int4Weight(iw.packed.to(DEV), iw.scale.to(DEV), iw.low.to(DEV), iw.group)
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEV)
    b = torch.randn(n_out).to(dtype).to(DEV) if bias else None
    got = quant_int4_triton.linear(x, dev, b)
    assert got.shape == (rows, n_out) and got.dtype == dtype
    want = q4.reference(x.cpu(), iw, None if b is None else b.cpu())
    assert rel(got.cpu(), want) < (1e-5 if INTERPRET else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON, reason="needs CUDA (or TRITON_INTERPRET=1) and triton")
def test_triton_int4_gemv_tiles() -> None:
    """Every tile shape the benchmark tries gives the same result; a step of groups that does
    not divide the row is refused."""
    from truffula.kernels import quant_int4_triton

    iw = q4.quantize(weight(48, 512, seed=9))
    dev = q4.Int4Weight(iw.packed.to(DEV), iw.scale.to(DEV), iw.low.to(DEV), iw.group)
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    want = q4.reference(x.cpu(), iw, None)
    for config in [(8, 1, 4, 3), (16, 2, 4, 3), (32, 4, 8, 4)]:
        got = quant_int4_triton.linear(x, dev, None, config)
        assert rel(got.cpu(), want) < (1e-5 if INTERPRET else 1e-2), config
    iw3 = q4.quantize(weight(48, 384))
    dev3 = q4.Int4Weight(iw3.packed.to(DEV), iw3.scale.to(DEV), iw3.low.to(DEV), iw3.group)
    with pytest.raises(ValueError, match="2 groups a step do not divide"):
        quant_int4_triton.linear(x[:, :384], dev3, None, (8, 2, 4, 3))
