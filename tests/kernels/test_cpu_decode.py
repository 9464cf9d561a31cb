"""Paged attention's decode rows in plain torch (the CPU path) against a per-sequence softmax
over the sequence's own cached keys: with and without a mask (none when every sequence is as
long as the longest, within the window), fp32 and bf16 caches (attended in fp32 on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from truffula.forward import AttentionMetadata
from truffula.kernels.attention_torch import paged_attention


def _decode_step(
    lens: list[int], dtype: torch.dtype, block_size: int = 4, in_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A decode-only step of ``len(lens)`` sequences over a cache filled with random keys and
    values, blocks handed out in a shuffled order (``in_order``: 2, 3, 4, ...)."""
    gen = torch.Generator().manual_seed(sum(lens))
    h, hkv, d = 6, 2, 16
    nblocks = [-(-n // block_size) for n in lens]
    order = torch.randperm(sum(nblocks), generator=gen) + 1  # block 0 is the null block
    if in_order:
        order = torch.arange(sum(nblocks)) + 2
    tables, at = [], 0
    for n in nblocks:
        tables.append(order[at : at + n].tolist())
        at += n
    width = max(nblocks)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = (sum(nblocks) + 2) * block_size
    k_cache = torch.randn(slots, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(slots, hkv, d, generator=gen).to(dtype)
    last = torch.tensor(
        [
            t[(n - 1) // block_size] * block_size + (n - 1) % block_size
            for t, n in zip(tables, lens, strict=True)
        ]
    )
    meta = AttentionMetadata(
        slot_mapping=last,
        block_tables=table,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32),
        num_decodes=len(lens),
        max_query_len=1,
        max_seq_len=max(lens),
        block_size=block_size,
        seq_lens_cpu=list(lens),
        query_start_loc_cpu=list(range(len(lens) + 1)),
    )
    q = torch.randn(len(lens), h, d, generator=gen).to(dtype)
    k = torch.randn(len(lens), hkv, d, generator=gen).to(dtype)
    v = torch.randn(len(lens), hkv, d, generator=gen).to(dtype)
    return q, k, v, k_cache, v_cache, meta


def _reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    out = []
    bs = meta.block_size
    for s, n in enumerate(meta.seq_lens_cpu):
        pos = torch.arange(n)
        pos = pos[pos > n - 1 - window] if window is not None else pos
        idx = meta.block_tables[s, pos // bs].long() * bs + pos % bs
        ks, vs = k_cache[idx].double(), v_cache[idx].double()  # [L, Hkv, d]
        rep = q.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        scores = torch.einsum("hd,lhd->hl", q[s].double(), ks) * scale
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), vs))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("lens", "window"),
    [([13], None), ([9, 9, 9], None), ([13, 5, 9], None), ([13, 5], 6), ([4], 6)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_match_the_reference(
    lens: list[int], window: int | None, dtype: torch.dtype
) -> None:
    q, k, v, k_cache, v_cache, meta = _decode_step(lens, dtype)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25, window)
    assert got.dtype == dtype and got.shape == q.shape
    want = _reference(q, k_cache, v_cache, meta, 0.25, window)  # the new keys are in the cache
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_order", [True, False])
def test_a_single_stream_in_consecutive_slots_reads_the_cache_in_place(
    dtype: torch.dtype, in_order: bool
) -> None:
    """One sequence whose blocks follow each other: attended over a slice of the cache (no
    gather), with the same result as the reference; shuffled blocks are gathered."""
    q, k, v, k_cache, v_cache, meta = _decode_step([13], dtype, in_order=in_order)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    _, _, span = meta.memo[("decode", None)]  # type: ignore[misc]
    assert (span == (8, 21)) if in_order else span is None
    want = _reference(q, k_cache, v_cache, meta, 0.25, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - want).abs().max().item() <= tol


TOL_BF16 = 0.08


@pytest.mark.parametrize("linears", ["torch", "packed"])
def test_a_bf16_model_on_cpu_tracks_the_fp32_reference(tmp_path: Path, linears: str) -> None:
    """``--dtype bfloat16`` on CPU (bf16 weights, KV cache and activations; logits and
    log-softmax in fp32) through prefill chunks, mixed decode batches (masked) and a single
    stream (unmasked): log-probabilities within bf16's rounding of the fp32 reference path's,
    and the same most likely token wherever the reference's leads by more than that."""
    from modelharness import Harness
    from transformers import AutoModelForCausalLM, LlamaConfig

    from truffula.kernels import linear_cpu

    if linears == "packed" and not linear_cpu.available(torch.bfloat16):
        pytest.skip("oneDNN bf16 packed linears are not available on this CPU")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 300, (23,), generator=gen).tolist()
    b = torch.randint(0, 300, (9,), generator=gen).tolist()
    steps = [{"a": a[:13]}, {"a": a[13:16], "b": b}]
    steps += [{"a": [a[t]], "b": [t]} for t in range(16, 20)] + [{"a": [t]} for t in a[20:]]
    ref = Harness(tmp_path)
    got = Harness(tmp_path, pack=linears == "packed", dtype=torch.bfloat16)
    assert got.runner.model.lm_head.weight.dtype == torch.bfloat16 or linears == "packed"
    for chunk in steps:
        want, have = ref.step(chunk), got.step(chunk)
        for rid in chunk:
            assert have[rid].dtype == torch.float32
            diff = (have[rid] - want[rid]).abs().max().item()
            assert diff <= TOL_BF16, diff
            # the same most likely token wherever the reference's is clear of rounding
            top2 = want[rid].topk(2, dim=-1).values
            clear = top2[:, 0] - top2[:, 1] > 2 * TOL_BF16
            assert torch.equal(have[rid].argmax(-1)[clear], want[rid].argmax(-1)[clear])
