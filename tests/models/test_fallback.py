"""Architectures without a native implementation (OPT, Bloom) through the transformers fallback:
same engine API and routes, same details, alternatives, rank, entropy and prompt logprobs."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch
from helpers import hf_logsoftmax
from serverproc import ServerProcess

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams

TOL = 1e-4


def tiny(kind: str):  # type: ignore[no-untyped-def]
    from transformers import BloomConfig, OPTConfig

    if kind == "opt":
        return OPTConfig(
            vocab_size=49152,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    return BloomConfig(
        vocab_size=49152,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


@pytest.fixture(scope="module", params=["opt", "bloom"])
def tiny_model(request, tmp_path_factory, model_dir):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny(request.param), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    return request.param, folder, hf


def test_generation_and_token_probabilities_match_hf(tiny_model) -> None:  # type: ignore[no-untyped-def]
    kind, folder, hf = tiny_model
    llm = LLM(str(folder), progress=False)
    assert llm.engine.serving_path == "fallback"
    prompts = ["The quick brown fox", "Hello there, how are", "1 2 3"]
    p = SamplingParams(
        max_new_tokens=8,
        temperature=0,
        ignore_eos=True,
        return_k_alternatives=5,
        decoder_input_details=True,
        prompt_k_alternatives=3,
    )
    outs = llm.generate(prompts, p)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = out.prompt_token_ids
        ref_gen = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            min_new_tokens=8,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=2,
        )
        assert out.token_ids == ref_gen[0, len(ids) :].tolist(), kind
        ref = hf_logsoftmax(hf, ids + out.token_ids)
        n = len(ids)
        for i, t in enumerate(out.tokens):
            row = ref[n - 1 + i]
            assert abs(t.logprob - row[t.id].item()) <= TOL and t.rank == 1
            assert [a.id for a in t.alternatives] == row.topk(5).indices.tolist()
            assert abs(t.entropy - float(-(row.exp() * row).sum())) <= 1e-3
        for pos in range(1, n):
            assert abs(out.prompt_tokens[pos].logprob - ref[pos - 1, ids[pos]].item()) <= TOL
        (alone,) = llm.generate([prompt], p)
        assert alone.token_ids == out.token_ids  # the batch gives what each request gives alone


def test_chunked_prefill_and_preemption(tiny_model) -> None:  # type: ignore[no-untyped-def]
    _, folder, _ = tiny_model
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, details=True)
    prompts = ["A long prompt that goes on and on " * 3, "short", "another one here"]
    ref = LLM(str(folder), progress=False).generate(prompts, p)
    small = LLM(
        str(folder),
        progress=False,
        max_num_batched_tokens=5,
        block_size=4,
        num_blocks=12,
        max_model_len=48,
    ).generate(prompts, p)
    for a, b in zip(small, ref, strict=True):
        assert a.token_ids == b.token_ids
        assert all(
            abs(x.logprob - y.logprob) <= TOL for x, y in zip(a.tokens, b.tokens, strict=True)
        )


def test_served_over_http_with_the_fallback(tiny_model) -> None:  # type: ignore[no-untyped-def]
    kind, folder, _ = tiny_model
    if kind != "opt":
        pytest.skip("one server start is enough")
    server = ServerProcess("--model", str(folder))
    try:
        info = httpx.get(server.url + "/info").json()
        assert info["serving_path"] == "fallback" and info["architecture"] == "OPTForCausalLM"
        r = httpx.post(
            server.url + "/generate",
            json={
                "inputs": "Hello",
                "parameters": {
                    "max_new_tokens": 4,
                    "return_k_alternatives": 3,
                    "decoder_input_details": True,
                },
            },
            timeout=60,
        )
        d = r.json()["details"]
        assert len(d["tokens"]) == 4 and all(len(t["alternative_tokens"]) == 3 for t in d["tokens"])
        assert d["prefill"][0]["logprob"] is None
        bad = httpx.post(
            server.url + "/generate",
            json={"inputs": "Hello", "parameters": {"adapter_id": "x"}},
            timeout=60,
        )
        assert bad.status_code == 422 and "fallback" in bad.json()["error"]
        assert "no native implementation" in Path(server.log).read_text()
    finally:
        server.stop()
