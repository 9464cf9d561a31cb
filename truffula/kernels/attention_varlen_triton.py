"""Paged attention for any mix of query lengths in one Triton launch, with every length read from
device memory: the attention of a step replayed as a CUDA graph when it holds prefill chunks.

Reference: ``kernels.attention_torch.paged_attention``. The host cuts each sequence's query
tokens into tiles of BLOCK_Q tokens and writes a tile map (``tile_seq``: the sequence of each
tile, -1 past the last; ``tile_q0``: its first query token within the sequence). One program
per (tile, kv head) holds the tile's BLOCK_Q tokens times the group's query heads as the rows
of one ``tl.dot`` and walks the sequence's cached keys block by block up to the tile's last
position (online softmax), reading block ids from the block table. The grid is fixed by the
map's size, so a graph captured for a token count serves any split of it into sequences
(``runner.graphs.tile_map`` builds the map). A sequence of one query token (a decode beside
prefill chunks) takes the group's heads alone as its rows, padded to 16 as in the decode
kernel, rather than BLOCK_Q tokens' worth of rows of which all but GROUP would be masked
(measured on an H200, 8B layout, 64 decodes beside a 128-256-token chunk: 57-70 against 67-83
µs a layer).

Split keys: a tile over a long cached prefix (a few new tokens after a prefix-cache hit) would
leave most of the GPU idle, so the map can give one tile several consecutive entries
(``tile_split``: which piece, ``tile_nsplit``: of how many). Each piece walks its share of the
key range and leaves its unnormalised sum, running max and denominator in a scratch buffer;
``_merge_kernel`` combines the pieces of each tile (a tile of one piece writes its output
directly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from truffula.kernels.triton_support import next_pow2, varlen_block_q


@triton.jit
def _varlen_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    qsl_ptr,
    tile_seq_ptr,
    tile_q0_ptr,
    tile_split_ptr,
    tile_nsplit_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_ot,
    stride_oh,
    scale,
    softcap,
    window,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DECODE_ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(tile_seq_ptr + tile)
    if s < 0:
        return
    s = s.to(tl.int64)
    qs = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - qs
    # a decode's tile is one token: its rows are the group's heads alone (as in the decode
    # kernel), not BLOCK_Q tokens' worth of rows of which all but GROUP would be masked
    if q_len == 1:
        _attend(
            q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, tile_q0_ptr, tile_split_ptr, tile_nsplit_ptr,
            out_ptr, part_acc_ptr, part_ml_ptr, stride_qt, stride_qh, stride_ks, stride_kh,
            stride_bt, stride_ot, stride_oh, scale, softcap, window, tile, kvh, s, qs, q_len,
            GROUP, DECODE_ROWS, 1, BLOCK_Q * GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
            HAS_WINDOW, HAS_SOFTCAP, IEEE,
        )  # fmt: skip
    else:
        _attend(
            q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, tile_q0_ptr, tile_split_ptr, tile_nsplit_ptr,
            out_ptr, part_acc_ptr, part_ml_ptr, stride_qt, stride_qh, stride_ks, stride_kh,
            stride_bt, stride_ot, stride_oh, scale, softcap, window, tile, kvh, s, qs, q_len,
            GROUP, GROUP_PAD, BLOCK_Q, BLOCK_Q * GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
            HAS_WINDOW, HAS_SOFTCAP, IEEE,
        )  # fmt: skip


@triton.jit
def _attend(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    tile_q0_ptr,
    tile_split_ptr,
    tile_nsplit_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_ot,
    stride_oh,
    scale,
    softcap,
    window,
    tile,
    kvh,
    s,
    qs,
    q_len,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PART_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One tile (or piece of one) of BLOCK_Q tokens x GROUP_PAD rows a token; a piece's
    partial results go where ``_merge_kernel`` reads them (PART_ROWS rows a tile and kv head,
    token-major: a one-token tile's rows are its first GROUP_PAD whatever its own padding)."""
    num_kvh = tl.num_programs(1)
    q0 = tl.load(tile_q0_ptr + tile)
    kv_len = tl.load(lens_ptr + s)
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = q0 + r // GROUP_PAD  # query token within the sequence
    g = r % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    pos = kv_len - q_len + tok  # absolute position of each row's token
    d = tl.arange(0, HEAD_DIM)
    t = (qs + tok).to(tl.int64)
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + t[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    hi = tl.minimum(kv_len, kv_len - q_len + q0 + BLOCK_Q)  # past the tile's last position
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(kv_len - q_len + q0 - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    piece = tl.load(tile_split_ptr + tile)
    pieces = tl.load(tile_nsplit_ptr + tile)
    chunk = tl.cdiv(tl.cdiv(hi - lo, pieces), BLOCK_N) * BLOCK_N
    lo = lo + piece * chunk
    hi = tl.minimum(hi, lo + chunk)  # a piece past the end walks nothing
    m = tl.full([BLOCK_Q * GROUP_PAD], -1e30, tl.float32)
    lsum = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < hi
        blk = tl.load(bt_ptr + s * stride_bt + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = (
            (blk * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        )
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(k)) * scale
        if HAS_SOFTCAP:
            sc = softcap * (2.0 * tl.sigmoid(2.0 * sc / softcap) - 1.0)
        keep = valid[None, :] & (n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            keep = keep & (n[None, :] > pos[:, None] - window)
        sc = tl.where(keep, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m - m_new)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    if pieces == 1:
        lsum = tl.where(row_ok, lsum, 1.0)
        o_ptr = out_ptr + t[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        at = (tile * num_kvh + kvh).to(tl.int64) * PART_ROWS + r
        tl.store(part_acc_ptr + at[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + 2 * at, m, mask=row_ok)
        tl.store(part_ml_ptr + 2 * at + 1, lsum, mask=row_ok)


@triton.jit
def _merge_kernel(
    qsl_ptr,
    tile_seq_ptr,
    tile_q0_ptr,
    tile_split_ptr,
    tile_nsplit_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """The output of each split tile from its pieces (run by the tile's first piece)."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kvh = tl.num_programs(1)
    s = tl.load(tile_seq_ptr + tile)
    pieces = tl.load(tile_nsplit_ptr + tile)
    if (s < 0) | (pieces == 1) | (tl.load(tile_split_ptr + tile) != 0):
        return
    s = s.to(tl.int64)
    q0 = tl.load(tile_q0_ptr + tile)
    qs = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - qs
    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, ROWS)
    tok = q0 + r // GROUP_PAD
    g = r % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    d = tl.arange(0, HEAD_DIM)
    m = tl.full([ROWS], -1e30, tl.float32)
    for j in range(pieces):
        at = ((tile + j) * num_kvh + kvh).to(tl.int64) * ROWS + r
        m = tl.maximum(m, tl.load(part_ml_ptr + 2 * at, mask=row_ok, other=-1e30))
    lsum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for j in range(pieces):
        at = ((tile + j) * num_kvh + kvh).to(tl.int64) * ROWS + r
        w = tl.exp(tl.load(part_ml_ptr + 2 * at, mask=row_ok, other=-1e30) - m)
        lsum += w * tl.load(part_ml_ptr + 2 * at + 1, mask=row_ok, other=0.0)
        part = tl.load(part_acc_ptr + at[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None])
        acc += w[:, None] * part
    lsum = tl.where(row_ok & (lsum > 0), lsum, 1.0)
    t = (qs + tok).to(tl.int64)
    heads = kvh * GROUP + g
    o_ptr = out_ptr + t[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    block_size: int,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """q [T, H, D]; caches [slots, Hkv, D]; ``tiles`` [4, N] int32 (sequence, first query
    token, piece, pieces: ``runner.graphs.tile_map``) -> [T, H, D]. Rows of no sequence
    (padding) are zero."""
    _, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    out = torch.zeros_like(q)
    block_q = varlen_block_q(h, hkv)
    rows = block_q * next_pow2(group)
    n = tiles.shape[1]
    part_acc = torch.empty(n * hkv * rows * d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(n * hkv * rows * 2, dtype=torch.float32, device=q.device)
    _varlen_kernel[(n, hkv)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        tiles[0],
        tiles[1],
        tiles[2],
        tiles[3],
        out,
        part_acc,
        part_ml,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale,
        softcap or 1.0,
        window or 0,
        GROUP=group,
        GROUP_PAD=next_pow2(group),
        DECODE_ROWS=max(16, next_pow2(group)),  # tl.dot's least
        BLOCK_Q=block_q,
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        BLOCK_N=max(16, min(64, block_size * 4)),
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32,
    )
    _merge_kernel[(n, hkv)](
        query_start_loc,
        tiles[0],
        tiles[1],
        tiles[2],
        tiles[3],
        out,
        part_acc,
        part_ml,
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=next_pow2(group),
        BLOCK_Q=block_q,
        HEAD_DIM=d,
    )
    return out
