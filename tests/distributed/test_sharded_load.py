"""Each rank's parameters are its slices of the checkpoint tensors (read as slices from the
safetensors file): q/k/v by KV head group (one KV head replicated over the ranks), o and down
by input columns (bias on rank 0 only), gate/up, embedding and LM head by rows; Phi-3's fused
tensors cut projection by projection. No process group: loading makes no collective."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed.tiny import make_model
from truffula.models.registry import load_model


@dataclass
class Rank:
    rank: int
    world: int

    def shard(self, size: int) -> tuple[int, int]:
        n = size // self.world
        return self.rank * n, n

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("loading makes no collective")


def rows(t: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    n = t.shape[0] // parts
    return t[rank * n : (rank + 1) * n]


@pytest.mark.parametrize("kind,kv", [("llama", 2), ("llama", 1), ("phi3", 2)])
def test_each_rank_holds_its_slices(tmp_path: Path, kind: str, kv: int) -> None:
    extra = {"pad_token_id": 0} if kind == "phi3" else {}
    folder = make_model(tmp_path / kind, kind, num_key_value_heads=kv, **extra)
    ckpt = load_file(str(folder / "model.safetensors"))
    p = "model.layers.0."
    if kind == "phi3":  # fused in the checkpoint: the projections as the others store them
        q, k, v = ckpt[p + "self_attn.qkv_proj.weight"].split([64, 16 * kv, 16 * kv])
        gate, up = ckpt[p + "mlp.gate_up_proj.weight"].chunk(2)
    else:
        q, k, v = (ckpt[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        gate, up = ckpt[p + "mlp.gate_proj.weight"], ckpt[p + "mlp.up_proj.weight"]
    for rank in (0, 1):
        loaded = load_model(folder, torch.float32, torch.device("cpu"), 64, shard=Rank(rank, 2))
        got = dict(loaded.model.named_parameters())
        kv_part = k if kv == 1 else rows(k, rank, 2)
        v_part = v if kv == 1 else rows(v, rank, 2)
        want_qkv = torch.cat([rows(q, rank, 2), kv_part, v_part])
        assert torch.equal(got[p + "self_attn.qkv_proj.weight"], want_qkv)
        want_o = ckpt[p + "self_attn.o_proj.weight"][:, rank * 32 : (rank + 1) * 32]
        assert torch.equal(got[p + "self_attn.o_proj.weight"], want_o)
        want_gu = torch.cat([rows(gate, rank, 2), rows(up, rank, 2)])
        assert torch.equal(got[p + "mlp.gate_up_proj.weight"], want_gu)
        want_down = ckpt[p + "mlp.down_proj.weight"][:, rank * 64 : (rank + 1) * 64]
        assert torch.equal(got[p + "mlp.down_proj.weight"], want_down)
        embed = rows(ckpt["model.embed_tokens.weight"], rank, 2)
        assert torch.equal(got["model.embed_tokens.weight"], embed)
        assert torch.equal(got["lm_head.weight"], rows(ckpt["lm_head.weight"], rank, 2))
        if kind == "llama":  # biases on every projection
            bias = ckpt[p + "self_attn.o_proj.bias"]
            want = bias if rank == 0 else torch.zeros_like(bias)
            assert torch.equal(got[p + "self_attn.o_proj.bias"], want)
            q_bias = rows(ckpt[p + "self_attn.q_proj.bias"], rank, 2)
            assert torch.equal(got[p + "self_attn.qkv_proj.bias"][:32], q_bias)
