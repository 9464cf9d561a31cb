"""Triton kernels against their torch references over shape and dtype sweeps.

Runs on CUDA; skipped without it (CI). ``TRITON_INTERPRET=1`` with triton installed runs the
same checks on the CPU through Triton's interpreter (fp32 only, slowly).
"""

from __future__ import annotations

import pytest
import torch

from kernels.triton_marks import DEV, DTYPES, INTERPRET, MARKS

pytestmark = MARKS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "offset"), [(1, 64, 0.0), (7, 576, 0.0), (33, 4096, 1.0)])
def test_add_rms_norm(dtype, rows: int, n: int, offset: float) -> None:
    from truffula.kernels.norm_triton import add_rms_norm
    from truffula.layers.norm import RMSNorm

    g = torch.Generator(device=DEV).manual_seed(rows)
    x = torch.randn(rows, n, device=DEV, generator=g).to(dtype)
    r = torch.randn(rows, n, device=DEV, generator=g).to(dtype)
    norm = RMSNorm(n, 1e-6, offset).to(DEV)
    norm.weight.data = torch.randn(n, device=DEV, generator=g).to(dtype)
    want_y, want_r = norm(x, r)
    y, res = add_rms_norm(x, r, norm.weight, 1e-6, offset)
    assert torch.equal(res, want_r)
    assert rel(y, want_y) < tol(dtype)
    y2, none = add_rms_norm(x, None, norm.weight, 1e-6, offset)
    assert none is None and rel(y2, norm(x)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "dim", "rot"), [(3, 64, 64), (12, 128, 128), (4, 80, 40), (40, 64, 64)]
)
def test_rotary(dtype, heads: int, dim: int, rot: int) -> None:
    from truffula.kernels.rotary_torch import rotate_half
    from truffula.kernels.rotary_triton import rotary

    g = torch.Generator(device=DEV).manual_seed(heads)
    t = 9
    base = torch.randn(t, heads + 2, dim, device=DEV, generator=g).to(dtype)
    x = base[:, :heads]  # a strided view, as q out of the fused qkv
    pos = torch.randint(0, 100, (t,), device=DEV, generator=g)
    freqs = torch.randn(100, rot // 2, device=DEV, generator=g)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    xr, rest = x[..., :rot].float(), x[..., rot:].float()
    want = torch.cat((xr * c + rotate_half(xr) * s, rest), -1)
    got = rotary(x, pos, cos, sin, rot)
    assert rel(got, want) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
def test_act_and_mul(dtype, gelu: bool) -> None:
    from truffula.kernels import activation_triton
    from truffula.kernels.activation_torch import act_and_mul

    x = torch.randn(5, 2 * 1536, device=DEV).to(dtype)
    want = act_and_mul(x.float(), "gelu_pytorch_tanh" if gelu else "silu")
    assert rel(activation_triton.act_and_mul(x, gelu), want) < tol(dtype)


FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8, reason="needs a GPU with fp8 (compute capability 8.9+)")
@pytest.mark.parametrize(
    ("rows", "n_out", "n_in", "bias"),
    [
        (1, 4096, 2048, False),
        (1, 20000, 1024, True),
        (1, 300, 1000, False),
        (3, 4096, 2048, True),
        (5, 300, 1000, True),
        (64, 6144, 4096, False),
        (64, 28672, 512, False),
        (65, 4096, 2048, True),
    ],
)
def test_fp8_linear(rows: int, n_out: int, n_in: int, bias: bool) -> None:
    """fp8 linears against the float32 reference: weight-only for one row (the GEMV), W8A8 with
    per-row activation scales for more (the Triton GEMM up to 64 rows, uneven shapes too;
    ``_scaled_mm`` above)."""
    from truffula.kernels import quant_fp8, quant_fp8_triton

    g = torch.Generator().manual_seed(n_out + rows)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    w[7] *= 40  # per-channel scales
    q, s = (t.to(DEV) for t in quant_fp8.quantize(w))
    x = torch.randn(rows, n_in, generator=g).to(torch.bfloat16).to(DEV)
    x[:, 5] *= 30  # an outlier channel, as activations have
    b = torch.randn(n_out, generator=g).to(torch.bfloat16).to(DEV) if bias else None
    want = quant_fp8.reference(x, q, s, b, activations=rows > 1)
    got = quant_fp8_triton.linear(x, q, s, s[None].contiguous(), b)
    assert got.shape == (rows, n_out) and got.dtype == torch.bfloat16
    assert rel(got, want) < 1e-2
    if rows > 1:  # the activations' quantization is visible against the weight-only result
        assert rel(want, quant_fp8.reference(x, q, s, b, activations=False)) > 1e-3


@pytest.mark.skipif(not (FP8 or INTERPRET), reason="needs a GPU with fp8 (or the interpreter)")
@pytest.mark.parametrize(
    ("rows", "n_out", "n_in", "bias"), [(5, 48, 512, True), (3, 40, 300, False)]
)
def test_fp8_gemm_reads_a_weight_view(rows: int, n_out: int, n_in: int, bias: bool) -> None:
    """The decode-step fp8 GEMM over a weight whose rows are a view of wider ones (the row
    stride is the weight's, not its width), uneven tiles, against the float32 W8A8 reference."""
    from truffula.kernels import quant_fp8, quant_fp8_triton

    g = torch.Generator().manual_seed(n_out)
    q, s = quant_fp8.quantize(torch.randn(n_out, n_in, generator=g) * 0.05)
    wide = torch.zeros(n_out, n_in + 16, dtype=q.dtype)
    wide[:, :n_in] = q
    q = wide[:, :n_in].to(DEV)
    s = s.to(DEV)
    x = torch.randn(rows, n_in, generator=g).to(torch.bfloat16).to(DEV)
    b = torch.randn(n_out, generator=g).to(torch.bfloat16).to(DEV) if bias else None
    xq, xs = quant_fp8.quantize_rows(x)
    got = quant_fp8_triton.gemm(xq, xs, q, s, b, torch.bfloat16, (16, 128, 4, 1))
    assert got.shape == (rows, n_out) and got.dtype == torch.bfloat16
    assert rel(got, quant_fp8.reference(x, q, s, b, activations=True)) < 1e-2


@pytest.mark.skipif(not FP8, reason="needs a GPU with fp8 (compute capability 8.9+)")
@pytest.mark.parametrize("n", [64, 1000, 14336])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantize_rows(n: int, dtype: torch.dtype) -> None:
    """Rounded to nearest, ties to even, from 16- and 32-bit activations alike."""
    from truffula.kernels import quant_fp8, quant_fp8_triton

    x = (torch.randn(9, n, generator=torch.Generator().manual_seed(n)) * 3).to(DEV)
    x = x.to(dtype)
    q, s = quant_fp8_triton.quantize_rows(x)
    rq, rs = quant_fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (9, 1)
    assert torch.allclose(s, rs, rtol=1e-6, atol=0)
    differ = (q.float() != rq.float()).float().mean().item()
    assert differ < 1e-3  # a rounding tie at most, one step apart
    assert ((q.float() - rq.float()).abs() <= rq.float().abs() / 8 + 2**-9).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block", "window", "softcap"),
    [
        (9, 3, 64, 16, None, None),
        (32, 8, 128, 16, None, None),
        (4, 4, 64, 8, 20, None),
        (8, 2, 64, 16, None, 30.0),
    ],
)
def test_decode_attention(dtype, heads, kv_heads, dim, block, window, softcap) -> None:
    from truffula.forward import AttentionMetadata
    from truffula.kernels.attention_torch import paged_attention
    from truffula.kernels.attention_triton import decode_attention

    g = torch.Generator().manual_seed(heads * dim)
    lens = [1, 17, 40, 75]
    b = len(lens)
    num_blocks = 64
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = torch.zeros(b, 16, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype).to(DEV)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype).to(DEV)
    q = torch.randn(b, heads, dim, generator=g).to(dtype).to(DEV)
    k_new = torch.randn(b, kv_heads, dim, generator=g).to(dtype).to(DEV)
    v_new = torch.randn(b, kv_heads, dim, generator=g).to(dtype).to(DEV)
    pos = torch.tensor([n - 1 for n in lens])
    slots = (tables[torch.arange(b), pos // block].long() * block + pos % block).to(DEV)
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.to(DEV),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEV),
        query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=DEV),
        num_decodes=b,
        max_query_len=1,
        max_seq_len=max(lens),
        block_size=block,
        seq_lens_cpu=lens,
        query_start_loc_cpu=list(range(b + 1)),
    )
    scale = dim**-0.5
    kc, vc = k_cache.clone(), v_cache.clone()
    want = paged_attention(
        q.float(),
        k_new.float(),
        v_new.float(),
        kc.float(),
        vc.float(),
        meta,
        scale,
        window,
        softcap,
    )
    k_cache.index_copy_(0, slots, k_new)
    v_cache.index_copy_(0, slots, v_new)
    for splits in (None, 1, 4, 16, 4):  # 16: splits left empty; 4 again: counters were reset
        got = decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            scale,
            block,
            window,
            softcap,
            splits=splits,
        )
        assert rel(got, want) < tol(dtype) * 2, splits
    from truffula.kernels.attention_triton import _COUNTERS

    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())  # left zero for the next


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bgmv(dtype) -> None:
    from truffula.kernels.lora_torch import lora_reference
    from truffula.kernels.lora_triton import lora_sgmv

    g = torch.Generator().manual_seed(3)
    slots, shards, rank, n_in, sizes = 4, 3, 12, 1200, [200, 100, 100]  # not block-aligned
    a = (torch.randn(slots, shards, rank, n_in, generator=g) * 0.1).to(dtype).to(DEV)
    bt = (torch.randn(slots, rank, sum(sizes), generator=g) * 0.1).to(dtype).to(DEV)
    offsets = [0, 200, 300]
    bts = [bt[:, :, o : o + n] for o, n in zip(offsets, sizes, strict=True)]
    x = torch.randn(11, n_in, generator=g).to(dtype).to(DEV)
    token_slots = torch.tensor([0, -1, 3, 3, 1, -1, 2, 0, 0, 1, 3], device=DEV)
    y = torch.randn(11, 400, generator=g).to(dtype).to(DEV)
    ref_bts = [b.float() for b in bts]
    want = lora_reference(y.float(), x.float(), a.float(), ref_bts, offsets, token_slots.cpu())
    from truffula.forward import segments

    seg = torch.tensor(segments(token_slots.tolist(), size=12), device=DEV)
    got = lora_sgmv(y.clone(), x, a, bt, offsets, seg)
    assert rel(got, want) < tol(dtype)
    per_token = lora_sgmv(y.clone(), x, a, bt, offsets, seg, token_slots)
    assert rel(per_token, want) < tol(dtype)
    one = lora_sgmv(y[:, :200].clone(), x, a[:, :1], bt[:, :, :200], [0], seg)
    assert rel(one, want[:, :200]) < tol(dtype)
    long = torch.tensor([2] * 40 + [-1] * 3 + [1] * 21, device=DEV)  # segments longer than a tile
    xl = torch.randn(64, n_in, generator=g).to(dtype).to(DEV)
    yl = torch.randn(64, 400, generator=g).to(dtype).to(DEV)
    want = lora_reference(yl.float(), xl.float(), a.float(), ref_bts, offsets, long.cpu())
    for max_len in (16, 64):  # 64: a shrink program loops over tiles of its segment
        seg = torch.tensor(segments(long.tolist(), max_len=max_len), device=DEV)
        got = lora_sgmv(yl.clone(), xl, a, bt, offsets, seg)
        assert rel(got, want) < tol(dtype), max_len
        got = lora_sgmv(yl.clone(), xl, a, bt, offsets, seg, long)
        assert rel(got, want) < tol(dtype), max_len
    # one adapter's tokens only, a number that fills no tile
    same = torch.tensor([1] * 20, device=DEV)
    want = lora_reference(yl[:20].float(), xl[:20].float(), a.float(), ref_bts, offsets, same.cpu())
    seg = torch.tensor(segments(same.tolist()), device=DEV)
    got = lora_sgmv(yl[:20].clone(), xl[:20], a, bt, offsets, seg, same)
    assert rel(got, want) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_into_cache(dtype) -> None:
    from truffula.kernels.rotary_torch import rotate_half
    from truffula.kernels.rotary_triton import rotary_into_cache

    g = torch.Generator(device=DEV).manual_seed(7)
    t, h, hkv, d = 5, 8, 2, 64
    qkv = torch.randn(t, h + 2 * hkv, d, device=DEV, generator=g).to(dtype)
    pos = torch.tensor([3, 0, 17, 9, 40], device=DEV)
    freqs = torch.randn(64, d // 2, device=DEV, generator=g)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    slots = torch.tensor([10, 3, 7, 0, 12], device=DEV)
    k_cache = torch.zeros(16, hkv, d, device=DEV, dtype=dtype)
    v_cache = torch.zeros(16, hkv, d, device=DEV, dtype=dtype)
    q = rotary_into_cache(qkv, h, hkv, pos, cos, sin, d, slots, k_cache, v_cache)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    x = qkv.float()
    want_q = x[:, :h] * c + rotate_half(x[:, :h]) * s
    want_k = x[:, h : h + hkv] * c + rotate_half(x[:, h : h + hkv]) * s
    assert rel(q, want_q) < tol(dtype)
    assert rel(k_cache[slots], want_k) < tol(dtype)
    assert torch.equal(v_cache[slots], qkv[:, h + hkv :])
    untouched = [i for i in range(16) if i not in slots.tolist()]
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "vocab"), [(1, 300), (5, 4099), (64, 49152 if INTERPRET else 128256)]
)
def test_row_stats(dtype, rows: int, vocab: int) -> None:
    """Log-sum-exp, entropy, chosen logit and rank in one pass against ``logprob_stats`` on the
    log-softmax: filtered (-inf) entries, a row with three tokens left, chosen tokens inside and
    outside the top, and ties with the chosen logit (rank counts strictly larger entries)."""
    from truffula.kernels.stats_torch import logprob_stats
    from truffula.kernels.stats_triton import TritonTokenStats, row_stats

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, vocab, generator=g) * 4
    chosen = torch.randint(0, vocab, (rows,), generator=g)
    chosen[0] = int(x[0].argmax())
    if rows > 1:
        x[1, ::3] = float("-inf")
        x[1, chosen[1]] = 2.0
        x[1, 7] = 2.0  # a tie with the chosen logit
    if rows > 2:
        x[2, 3:] = float("-inf")
        chosen[2] = 1
    x = x.to(dtype).float()  # values a bf16 model could produce, exactly
    x, chosen = x.to(DEV), chosen.to(DEV)
    st = row_stats(x.to(dtype), chosen).cpu()
    _, lps, ranks, entropy = logprob_stats(x.cpu().double().log_softmax(-1), chosen.cpu(), 0)
    lse = x.cpu().double().logsumexp(-1)
    assert (st[:, 0].double() - lse).abs().max() < 1e-4
    assert (st[:, 1].double() - entropy).abs().max() < 1e-4
    assert torch.equal(st[:, 2], x.cpu().gather(1, chosen.cpu()[:, None]).squeeze(1))
    assert torch.equal(st[:, 3].long(), ranks)
    got = TritonTokenStats().stats(x.to(dtype), chosen, 5)  # the sampler's CUDA path, top-k too
    torch.testing.assert_close(got[1].cpu().double()[:, 0], lps[:, 0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 300), (3, 4096), (5, 9001)])
def test_argmax_rows(dtype, rows: int, vocab: int) -> None:
    """First index of the maximum, as ``torch.argmax``: ties inside a chunk and across chunks
    (the earlier wins), a row all -inf, maxima in the last partial chunk."""
    from truffula.kernels.stats_triton import argmax_rows

    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    x[0, vocab - 1] = 50.0  # in the last, partial chunk
    if rows > 1:
        x[1, [17, 40, vocab - 2]] = 60.0  # tied: the first wins
    if rows > 2:
        x[2] = float("-inf")
    if rows > 3:
        x[3, [4095, 4096]] = 70.0  # tied across the chunk boundary
    got = argmax_rows(x.to(DEV)).cpu()
    assert got.dtype == torch.long
    assert torch.equal(got, x.float().argmax(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_out", "n_in", "bias"), [(4096, 2048, False), (20000, 1024, True), (300, 1000, False)]
)
def test_gemv(dtype, n_out: int, n_in: int, bias: bool) -> None:
    """One-row linear against ``F.linear`` in fp64: every tile configuration, uneven shapes."""
    from truffula.kernels import linear_triton

    g = torch.Generator().manual_seed(n_out)
    w = (torch.randn(n_out, n_in, generator=g) * 0.05).to(dtype).to(DEV)
    x = torch.randn(1, n_in, generator=g).to(dtype).to(DEV)
    b = torch.randn(n_out, generator=g).to(dtype).to(DEV) if bias else None
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = linear_triton.gemv(x, w, b)
    assert got.shape == (1, n_out) and got.dtype == dtype
    assert rel(got, want) < tol(dtype)
    if dtype != torch.float32:
        assert linear_triton.weight_fits(w) and linear_triton.one_row(x, w)
        assert not linear_triton.one_row(x.expand(2, -1), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("half", "n_in", "bias", "glu"),
    [(14336, 1024, False, 1), (300, 1000, True, 1), (2048, 512, False, 2), (20, 256, False, 2)],
)
def test_gemv_gated(dtype, half: int, n_in: int, bias: bool, glu: int) -> None:
    """The GEMV over a [gate | up] weight with the gated activation in its epilogue against
    ``F.linear`` in fp64 then the torch activation (SiLU, tanh-GELU); uneven halves."""
    from truffula.kernels import activation_torch, linear_triton
    from truffula.kernels.activation_triton import GLU_SILU

    g = torch.Generator().manual_seed(half + glu)
    w = (torch.randn(2 * half, n_in, generator=g) * 0.05).to(dtype).to(DEV)
    x = torch.randn(1, n_in, generator=g).to(dtype).to(DEV)
    b = torch.randn(2 * half, generator=g).to(dtype).to(DEV) if bias else None
    y = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    act = activation_torch.gated("silu" if glu == GLU_SILU else "gelu_pytorch_tanh")
    want = act(y)
    got = linear_triton.gemv(x, w, b, glu=glu)
    assert got.shape == (1, half) and got.dtype == dtype
    assert rel(got, want) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block", "window", "softcap"),
    [
        (32, 8, 128, 16, None, None),
        (9, 3, 64, 16, None, None),
        (4, 4, 64, 8, 20, None),
        (8, 2, 64, 16, None, 30.0),
    ],
)
@pytest.mark.parametrize("pieces", [0, 64])
def test_varlen_attention(dtype, heads, kv_heads, dim, block, window, softcap, pieces) -> None:
    """Decodes, a whole prompt and prefill chunks over cached tokens in one launch, with the
    layout read from a tile map padded past the last tile, against the torch reference; with
    ``pieces``, tiles over long key ranges are split and their pieces merged."""
    from truffula.forward import AttentionMetadata
    from truffula.kernels.attention_torch import paged_attention
    from truffula.kernels.attention_varlen_triton import varlen_attention
    from truffula.kernels.triton_support import varlen_block_q
    from truffula.runner.graphs import max_tiles, tile_map

    g = torch.Generator().manual_seed(heads * dim + block)
    seqs = [(1, 1), (40, 1), (75, 1), (37, 37), (75, 20), (130, 64), (17, 3), (300, 5)]
    lens, qlens = [s[0] for s in seqs], [s[1] for s in seqs]
    b, t = len(seqs), sum(qlens)
    num_blocks = 128
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = torch.zeros(b, 48, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype).to(DEV)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype).to(DEV)
    q = torch.randn(t, heads, dim, generator=g).to(dtype).to(DEV)
    k_new = torch.randn(t, kv_heads, dim, generator=g).to(dtype).to(DEV)
    v_new = torch.randn(t, kv_heads, dim, generator=g).to(dtype).to(DEV)
    pos = torch.cat([torch.arange(n - ql, n) for n, ql in seqs])
    owner = torch.cat([torch.full((ql,), i) for i, (_, ql) in enumerate(seqs)])
    slots = (tables[owner, pos // block].long() * block + pos % block).to(DEV)
    starts = [0]
    for ql in qlens:
        starts.append(starts[-1] + ql)
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.to(DEV),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEV),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEV),
        num_decodes=3,
        max_query_len=max(qlens),
        max_seq_len=max(lens),
        block_size=block,
        seq_lens_cpu=lens,
        query_start_loc_cpu=starts,
    )
    scale = dim**-0.5
    kc, vc = k_cache.float().clone(), v_cache.float().clone()
    want = paged_attention(
        q.float(), k_new.float(), v_new.float(), kc, vc, meta, scale, window, softcap
    )
    k_cache.index_copy_(0, slots, k_new)
    v_cache.index_copy_(0, slots, v_new)
    bq = varlen_block_q(heads, kv_heads)
    size = max_tiles(t + 5, b + 2, bq) + pieces
    tiles = torch.tensor(tile_map(qlens, bq, size, lens, pieces, 32), dtype=torch.int32)
    assert (tiles[3].max() > 1) == bool(pieces)
    pad = torch.zeros(5, heads, dim, dtype=dtype, device=DEV)  # rows of no sequence
    got = varlen_attention(
        torch.cat([q, pad]),
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        tiles.to(DEV),
        scale,
        block,
        window,
        softcap,
    )
    assert rel(got[:t], want) < tol(dtype) * 2
    assert not got[t:].any()
