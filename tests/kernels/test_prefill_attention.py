"""The prefill-chunk attention kernel (``kernels.attention_prefill_triton``) against the torch
reference: chunks after cached keys, a whole prompt, grouped heads, lengths off the tiles; keys
and values read with plain loads and through TMA tensor descriptors (Hopper-class GPUs, and
Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from kernels.triton_marks import DEV, DTYPES, INTERPRET, MARKS

pytestmark = MARKS
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
TMA = [False, True] if INTERPRET or HOPPER else [False]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 softmax attention with the bottom-right causal mask."""
    n_q, h, _ = q.shape
    n_kv, hkv = k.shape[0], k.shape[1]
    rep = h // hkv
    kk = k.double().repeat_interleave(rep, 1).transpose(0, 1)  # [H, Lk, D]
    vv = v.double().repeat_interleave(rep, 1).transpose(0, 1)
    s = torch.matmul(q.double().transpose(0, 1), kk.transpose(1, 2)) * scale  # [H, Lq, Lk]
    i = torch.arange(n_q, device=q.device)[:, None] + (n_kv - n_q)
    j = torch.arange(n_kv, device=q.device)[None, :]
    s = s.masked_fill(j > i, float("-inf"))
    return torch.matmul(s.softmax(-1), vv).transpose(0, 1)  # [Lq, H, D]


@pytest.mark.parametrize("tma", TMA)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_q", "n_kv", "heads", "kv_heads", "dim"),
    [
        (70, 70, 4, 2, 64),  # a whole prompt
        (100, 357, 8, 2, 64),  # a chunk after 257 cached keys
        (33, 161, 6, 6, 32),  # no grouping, lengths off every tile
        (1, 90, 4, 1, 64),  # one query
        (200, 200 + 128, 32, 8, 128),  # the 8B layout, a cache of exactly two tiles
        (40, 170, 2, 1, 256),  # Gemma's head dimension: smaller tiles
    ],
)
def test_chunk_attention(
    dtype, n_q: int, n_kv: int, heads: int, kv_heads: int, dim: int, tma: bool
) -> None:
    from truffula.kernels.attention_prefill_triton import chunk_attention

    if INTERPRET and heads == 32:
        pytest.skip("the 8B layout is slow through the interpreter")
    g = torch.Generator().manual_seed(n_q * 7 + n_kv)
    q = torch.randn(n_q, heads, dim, generator=g).to(dtype).to(DEV)
    # keys and values as gathered from a cache: rows of a wider tensor
    k = torch.randn(n_kv, kv_heads + 1, dim, generator=g).to(dtype).to(DEV)[:, 1:]
    v = torch.randn(n_kv, kv_heads + 1, dim, generator=g).to(dtype).to(DEV)[:, :-1]
    scale = dim**-0.5
    got = chunk_attention(q, k, v, scale, tma=tma)
    want = reference(q, k, v, scale)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < (2e-5 if dtype == torch.float32 else 1e-2), err
