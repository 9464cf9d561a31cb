"""The engine on CUDA (Triton kernels, CUDA graphs) against HF transformers on the same GPU.

Tiny random-weight models with a small byte-level BPE tokenizer trained here, so nothing needs
a download. fp32: logprobs within 1e-4 and greedy equality; bf16: within bf16 tolerance.
Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.gpu_models import PROMPTS, TEXTS, assert_fp32_matches_hf, cuda_logsoftmax, hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def lora_llm(tiny: Path, adapter_root: Path, graphs: bool, max_num_seqs: int):  # type: ignore[no-untyped-def]
    """An fp32 CUDA engine serving the adapters saved under ``adapter_root``."""
    from truffula.engine.llm import LLM

    return LLM(
        str(tiny),
        progress=False,
        device="cuda",
        dtype="float32",
        adapter_root=str(adapter_root),
        cuda_graphs=graphs,
        max_num_seqs=max_num_seqs,
    )


@pytest.mark.parametrize("graphs", [True, False])
def test_fp32_cuda_matches_hf(tiny: Path, graphs: bool) -> None:
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(
        str(tiny),
        progress=False,
        device="cuda",
        dtype="float32",
        cuda_graphs=graphs,
        max_num_seqs=8,
    )
    assert (llm.engine.runner.graphs is not None) == graphs
    ref_model = hf(tiny, torch.float32)
    p = SamplingParams(
        max_new_tokens=12,
        temperature=0,
        ignore_eos=True,
        return_k_alternatives=5,
        decoder_input_details=True,
    )
    outs = llm.generate(PROMPTS, p)
    for out in outs:
        assert_fp32_matches_hf(out, ref_model, 5)
    if graphs:
        assert llm.engine.runner.graphs.graphs  # decode steps replayed captured graphs


def test_bf16_cuda_within_bf16_tolerance(tiny: Path) -> None:
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(str(tiny), progress=False, device="cuda", max_num_seqs=8)
    assert llm.engine.dtype == torch.bfloat16
    ref_model = hf(tiny, torch.float32)
    outs = llm.generate(
        PROMPTS,
        SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, return_k_alternatives=3),
    )
    for out in outs:
        ids = out.prompt_token_ids + out.token_ids
        with torch.no_grad():
            ref = cuda_logsoftmax(ref_model, ids)
        n = len(out.prompt_token_ids)
        for i, t in enumerate(out.tokens):
            row = ref[n - 1 + i]
            assert abs(t.logprob - row[t.id].item()) < 0.05
            assert (
                row[t.id] >= row.max() - 0.05
            )  # greedy on bf16 logits: the argmax up to bf16 ties


def test_lora_on_cuda_matches_peft(tiny: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from truffula.sampling.params import SamplingParams

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "ad")
    model = model.cuda().eval()
    for graphs in (True, False):
        llm = lora_llm(tiny, tmp_path, graphs, max_num_seqs=8)
        p = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, details=True)
        outs = llm.generate(
            PROMPTS,
            [p.with_updates(adapter_id="ad" if i % 2 else None) for i in range(len(PROMPTS))],
        )
        for i, out in enumerate(outs):
            ids = out.prompt_token_ids + out.token_ids
            with torch.no_grad():
                if i % 2:
                    ref = cuda_logsoftmax(model, ids)
                else:
                    with model.disable_adapter():
                        ref = cuda_logsoftmax(model, ids)
            n = len(out.prompt_token_ids)
            assert out.token_ids == ref[n - 1 : -1].argmax(-1).tolist(), (graphs, i)
            for j, t in enumerate(out.tokens):
                assert abs(t.logprob - ref[n - 1 + j, t.id].item()) < 1e-4


def test_async_scheduling_on_cuda_equals_sync(tiny: Path) -> None:
    """Steps launched ahead (placeholder tokens read on the device, CUDA graphs) give the
    synchronous engine's tokens and logprobs, with seeds, penalties, stops and early ends."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    params = [
        SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True, return_k_alternatives=5),
        SamplingParams(max_new_tokens=24, temperature=0.9, seed=4, stop=("e",), details=True),
        SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.5, details=True),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=2, details=True),
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    params = [params[i % len(params)] for i in range(8)]
    results = []
    for mode in ("off", "on"):
        llm = LLM(
            str(tiny),
            progress=False,
            device="cuda",
            dtype="float32",
            max_num_seqs=8,
            async_scheduling=mode,
        )
        assert llm.engine.overlap == (mode == "on")
        results.append(llm.generate(prompts, params))
        assert llm.engine.pool.num_used == 0
    for a, b in zip(*results, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-5


def test_large_decode_graphs_with_and_without_lora_equal_eager(tiny: Path, tmp_path: Path) -> None:
    """48 concurrent requests, half with an adapter: decode graphs of 48 rows (captured with
    cuBLASLt GEMMs, base graph at start-up and LoRA graph on first use) give the eager engine's
    tokens and logprobs, run after run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from truffula.runner.graphs import LT_BATCHES
    from truffula.sampling.params import SamplingParams

    assert 48 in LT_BATCHES
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, cfg)
    model.save_pretrained(tmp_path / "ad")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(48)]
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, details=True)
    params = [p.with_updates(adapter_id="ad" if i % 2 else None) for i in range(48)]
    results = []
    for graphs in (False, True):
        llm = lora_llm(tiny, tmp_path, graphs, max_num_seqs=48)
        runs = [llm.generate(prompts, params) for _ in range(3)]
        if graphs:
            assert (48, True) in llm.engine.runner.graphs.graphs
        results.append(runs)
    eager = results[0][0]
    for run in results[1]:
        for a, b in zip(run, eager, strict=True):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.tokens, b.tokens, strict=True):
                assert abs(x.logprob - y.logprob) < 1e-4


def test_steps_with_prefill_chunks_replay_graphs_and_match_hf(tiny: Path) -> None:
    """Three running requests at a time and a 4-token prefill cap while they decode: later
    requests prefill in chunks beside the decodes that outnumber them, in mixed-step CUDA
    graphs; every logprob, rank and alternative matches HF (fp32)."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(
        str(tiny),
        progress=False,
        device="cuda",
        dtype="float32",
        max_num_seqs=3,
        max_prefill_while_decoding=4,
    )
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.mixed_sizes[-1] == 3 + 4
    replays = []
    run = graphs.run

    def counted(seqs, fill=None):  # type: ignore[no-untyped-def]
        replays.append(sum(s.num_tokens for s in seqs) > len(seqs))
        return run(seqs, fill)

    graphs.run = counted
    ref_model = hf(tiny, torch.float32)
    prompts = PROMPTS + [p.upper() for p in PROMPTS]
    params = [
        SamplingParams(
            max_new_tokens=6 + 3 * i,
            temperature=0,
            ignore_eos=True,
            return_k_alternatives=4,
            decoder_input_details=True,
        )
        for i in range(len(prompts))
    ]
    outs = llm.generate(prompts, params)
    assert any(replays), "no step with a prefill chunk was replayed from a graph"
    for out in outs:
        assert_fp32_matches_hf(out, ref_model, 4)


def test_long_prompts_prefilled_in_chunks_match_hf(tiny: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Prompts of several step budgets, run eagerly: every chunk after the first attends to
    the cached ones through the prefill-chunk kernel (``chunk_attention``); prompt and generated
    logprobs, ranks and alternatives match HF (fp32)."""
    from truffula.engine.llm import LLM
    from truffula.kernels import attention_triton
    from truffula.sampling.params import SamplingParams

    calls = []
    kernel = attention_triton.chunk_attention

    def counted(q, k, v, scale):  # type: ignore[no-untyped-def]
        calls.append((q.shape[0], k.shape[0]))
        return kernel(q, k, v, scale)

    monkeypatch.setattr(attention_triton, "chunk_attention", counted)
    llm = LLM(
        str(tiny),
        progress=False,
        device="cuda",
        dtype="float32",
        cuda_graphs=False,
        max_num_seqs=4,
        max_num_batched_tokens=48,
    )
    ref_model = hf(tiny, torch.float32)
    prompts = [" ".join(TEXTS[i : i + 10 + 4 * i]) for i in range(3)]
    p = SamplingParams(
        max_new_tokens=5,
        temperature=0,
        ignore_eos=True,
        return_k_alternatives=4,
        decoder_input_details=True,
    )
    outs = llm.generate(prompts, p)
    assert any(kv > q for q, kv in calls), calls
    for out in outs:
        assert len(out.prompt_token_ids) > 2 * 48
        assert_fp32_matches_hf(out, ref_model, 4)


def test_prefix_cache_hits_on_cuda_match_hf_for_base_and_adapter(
    tiny: Path, tmp_path: Path
) -> None:
    """Continuations of a long shared context, base and adapter, on CUDA (fp32, graphs): the
    second of each shares the first's cached blocks (records included, alternatives too); every
    prompt and output record matches HF / peft, and the adapter never reads the base's blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from truffula.sampling.params import SamplingParams

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "ad")
    model = model.cuda().eval()
    llm = lora_llm(tiny, tmp_path, True, max_num_seqs=4)
    cache = llm.engine.prompts.cache
    context = " ".join(TEXTS[:12])  # a few hundred tokens: many 16-token blocks
    p = SamplingParams(
        max_new_tokens=4,
        temperature=0,
        ignore_eos=True,
        return_k_alternatives=4,
        decoder_input_details=True,
        prompt_k_alternatives=4,
    )
    for adapter in (None, "ad"):
        hits = []
        for question in (" the quick brown fox", " one two three"):
            before = cache.hits
            (out,) = llm.generate([context + question], p.with_updates(adapter_id=adapter))
            hits.append(cache.hits - before)
            ids = out.prompt_token_ids + out.token_ids
            with torch.no_grad():
                if adapter:
                    ref = cuda_logsoftmax(model, ids)
                else:
                    with model.disable_adapter():
                        ref = cuda_logsoftmax(model, ids)
            n = len(out.prompt_token_ids)
            assert out.token_ids == ref[n - 1 : -1].argmax(-1).tolist(), (adapter, question)
            for i, t in enumerate(out.tokens):
                assert abs(t.logprob - ref[n - 1 + i, t.id].item()) < 1e-4
                assert [a.id for a in t.alternatives] == ref[n - 1 + i].topk(4).indices.tolist()
            for pos in range(1, n):
                rec = out.prompt_tokens[pos]
                assert abs(rec.logprob - ref[pos - 1, ids[pos]].item()) < 1e-4, (adapter, pos)
                assert [a.id for a in rec.alternatives] == ref[pos - 1].topk(4).indices.tolist()
        # the first request of each model found nothing (the adapter not the base's blocks);
        # the second found the context's full blocks
        assert hits[0] == 0 and hits[1] >= 160, (adapter, hits)
