"""truffula on one NVIDIA GPU, every number beside a peer or bound measured in the same run.

    python benchmarks/gpu.py [--quick] [--out DIR]

(a) Llama-3-8B-shaped model, random bf16 weights: batch-1 decode ms/token, % of the roofline
    (weight bytes over the measured device copy bandwidth), HF transformers ``generate`` tok/s.
(b) 64 concurrent requests, 512 in / 128 out (ignore_eos): output tok/s, decode step ms against
    the batch-64 roofline (weights + KV bytes).
(c) k = 0 / 5 / 20 alternatives for all 64 requests: throughput ratios, five repeats, the
    worst reported.
(d) 64 requests over 1, 16 and 64 distinct rank-16 adapters on all projections: ratio to base.
(e) A Llama-3.2-1B-shaped model: batch-1 ms/token.
(f) One prompt of 2k to 32k tokens: time to first token and MFU against HF's forward
    (``benchmarks/prefill.py``).
Also a throughput-vs-concurrency sweep; PNG plots and a JSON of every number go to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import random_adapters  # noqa: E402

from truffula import heap  # noqa: E402
from truffula.config import EngineConfig  # noqa: E402
from truffula.engine.core import EngineCore  # noqa: E402
from truffula.layers.lora import LoRALinear  # noqa: E402
from truffula.sampling.params import SamplingParams  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)
LLAMA32_1B = dict(
    LLAMA3_8B,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_key_value_heads=8,
    num_attention_heads=32,
    tie_word_embeddings=True,
)


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 20."""
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 2 / statistics.median(times[5:])


def tokenizer_folder(vocab: int) -> Path:
    """A byte-level BPE tokenizer (trained here, no download) padded to the model's vocabulary."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = Path(tempfile.mkdtemp(prefix="truffula-bench-"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 50,
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    return folder


def build(shape: dict[str, Any]) -> tuple[torch.nn.Module, Path]:
    """A random bf16 HF Llama on the GPU and a folder with its config and a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    folder = tokenizer_folder(config.vocab_size)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return hf, folder


def build_8b(quick: bool = False) -> tuple[torch.nn.Module, Path]:
    """``build`` of the Llama-3-8B shape (``quick``: the Llama-3.2-1B shape, a smoke run)."""
    return build(LLAMA32_1B if quick else LLAMA3_8B)


def engine_for(folder: Path, hf: torch.nn.Module, **options: Any) -> EngineCore:
    cfg = EngineConfig.from_kwargs(
        model=str(folder), device="cuda", dtype="bfloat16", max_model_len=4096, **options
    )
    return EngineCore(cfg, progress=False, weights=hf.state_dict())


def engine_8b(folder: Path, hf: torch.nn.Module) -> EngineCore:
    """The engine of (a)-(d): 64 running requests, room for 64 rank-16 adapters; no prefix
    cache, since (b)-(d) send the same prompts again (every run prefills them)."""
    return engine_for(
        folder,
        hf,
        enable_prefix_caching=False,
        max_num_seqs=64,
        kv_cache_memory=12 << 30,
        max_num_batched_tokens=4096,
        max_active_adapters=64,
        max_lora_rank=16,
    )


def weight_bytes(hf: torch.nn.Module) -> int:
    """Bytes a decode step must read: every weight but the input embedding (only gathered)."""
    total = sum(p.numel() * p.element_size() for p in hf.parameters())
    emb = hf.model.embed_tokens.weight
    tied = hf.lm_head.weight.data_ptr() == emb.data_ptr()
    return total - (0 if tied else emb.numel() * emb.element_size())


def run(
    core: EngineCore, prompts: list[list[int]], params: list[SamplingParams], warm: bool = True
) -> dict[str, float]:
    """Serve all requests at once; returns wall time, output tokens and decode-step times.
    A short untimed pass first compiles kernels and captures graphs for this configuration."""
    if warm:
        run(core, prompts, [q.with_updates(max_new_tokens=3) for q in params], warm=False)
    for p, q in zip(prompts, params, strict=True):
        core.add_request(p, q)
    steps: list[float] = []
    tokens = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while core.has_work():
        s0 = time.perf_counter()
        outs = core.step()
        dt = time.perf_counter() - s0
        if (
            core.scheduler.running
            and all(r.num_pending <= 1 for r in core.scheduler.running)
            and len(outs) == len(prompts)
        ):
            steps.append(dt)
        tokens += sum(len(o.tokens) for o in outs)
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "step_ms": 1e3 * statistics.median(steps) if steps else float("nan"),
    }


def adapter_bytes(core: EngineCore, rank: int) -> int:
    """Bytes of one rank-``rank`` adapter over every wrapped projection (each shard's A, and
    B): what a decode step reads once for each distinct adapter it serves."""
    total = 0
    for m in core.runner.model.modules():
        if isinstance(m, LoRALinear):
            n_shards, _, d_in = m.a.shape[1:]
            total += rank * (n_shards * d_in + m.bt.shape[2]) * m.a.element_size()
    return total


def batch1_ms_per_token(core: EngineCore, n: int = 128) -> float:
    p = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    run(core, [[5] * 16], [p.with_updates(max_new_tokens=8)], warm=False)  # warm-up
    core.add_request([7] * 16, p)
    times = []
    while core.has_work():
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[2:])


def hf_generate_tok_s(hf: torch.nn.Module, n: int = 128) -> float:
    ids = torch.full((1, 16), 7, device="cuda")
    hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens (a smoke run)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--skip-8b", action="store_true", help="(e) only")
    ap.add_argument("--sections", default="abcdef", help="which of (a)-(f) to run, e.g. bc")
    ap.add_argument("--profile", action="store_true", help="print where decode steps spend time")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    bw = measure_bandwidth()
    res["copy_bw_GBs"] = bw / 1e9
    print(f"device {res['device']}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)

    sections = "e" if args.skip_8b else args.sections
    if "e" in sections:  # Llama-3.2-1B shape, batch 1
        res.update(one_b(bw))
    if not set(sections) & set("abcdf"):
        (out_dir / "gpu.json").write_text(json.dumps(res, indent=2))
        return
    if args.profile:
        import gpu_report

        gpu_report.profile(out_dir)
        return
    n_req = 16 if args.quick else 64
    new = 32 if args.quick else 128
    if set(sections) & set("abcd"):
        eight_b(res, sections, bw, n_req, new)
    if "f" in sections and not args.quick:  # one long prompt at a time, beside HF's forward
        import prefill

        res["f_prefill"] = prefill.run(prefill.LENGTHS, 3)
    (out_dir / "gpu.json").write_text(json.dumps(res, indent=2))
    if set(sections) >= set("bd"):
        import gpu_report

        gpu_report.plot(res, out_dir)


def one_b(bw: float) -> dict[str, float]:
    """(e): the Llama-3.2-1B shape at batch 1."""
    res: dict[str, float] = {}
    hf1, f1 = build(LLAMA32_1B)
    core1 = engine_for(f1, hf1, max_num_seqs=8, kv_cache_memory=2 << 30)
    res["e_1b_ms_per_token"] = batch1_ms_per_token(core1)
    res["e_1b_roofline_ms"] = 1e3 * weight_bytes(hf1) / bw
    res["e_1b_hf_tok_s"] = hf_generate_tok_s(hf1, 64)
    print(
        f"(e) 1B batch-1: {res['e_1b_ms_per_token']:.2f} ms/token (roofline {res['e_1b_roofline_ms']:.2f} ms; HF {res['e_1b_hf_tok_s']:.0f} tok/s)",
        flush=True,
    )
    del core1, hf1
    torch.cuda.empty_cache()
    return res


def eight_b(res: dict[str, Any], sections: str, bw: float, n_req: int, new: int) -> None:
    """(a)-(d): the Llama-3-8B shape."""
    hf8, f8 = build(LLAMA3_8B)
    wbytes = weight_bytes(hf8)
    core = engine_8b(f8, hf8)
    if "a" in sections:
        batch_one(res, hf8, core, wbytes, bw, 64 if n_req < 64 else 128)
    if not set(sections) & set("bcd"):  # (b) is what (c) and (d) compare with
        return
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (512,), generator=gen).tolist() for _ in range(n_req)]
    base = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    # untimed burn-in at full size: the first 64-request run of a process is slower (pinned
    # host buffers and allocator pools growing), and every number below is of a warm engine
    run(core, prompts, [base] * n_req, warm=False)
    heap.settle()  # the collector as in the server's engine process (truffula/heap.py)
    r0 = run(core, prompts, [base] * n_req)
    kv_token = 2 * 32 * 8 * 128 * 2
    ctx = 512 + new / 2
    roof_step = 1e3 * (wbytes + n_req * ctx * kv_token) / bw
    res["b_tok_s"], res["b_step_ms"], res["b_roofline_step_ms"] = (
        r0["tok_s"],
        r0["step_ms"],
        roof_step,
    )
    res["b_step_over_roofline"] = r0["step_ms"] / roof_step
    print(
        f"(b) {n_req} x 512 in / {new} out: {r0['tok_s']:.0f} output tok/s; decode step "
        f"{r0['step_ms']:.2f} ms = {res['b_step_over_roofline']:.2f}x its roofline "
        f"{roof_step:.2f} ms",
        flush=True,
    )
    if "b" in sections:
        core.overlap = False
        r_sync = run(core, prompts, [base] * n_req)
        core.overlap = True
        res["b_sync_tok_s"], res["b_sync_step_ms"] = r_sync["tok_s"], r_sync["step_ms"]
        print(
            f"(b) without asynchronous scheduling {r_sync['tok_s']:.0f} tok/s, "
            f"{r_sync['step_ms']:.2f} ms",
            flush=True,
        )
        res["concurrency_tok_s"] = {
            conc: run(core, prompts[:conc], [base] * conc)["tok_s"]
            for conc in ([1, 8, 16] if n_req < 64 else [1, 8, 16, 32, 64])
        }
    if "c" in sections:
        alternatives(res, core, prompts, base)
    if "d" in sections:
        keys = random_adapters(core.adapters, n_req, 16, 0.01, "cuda", torch.bfloat16)
        res["d"], res["d_bound"] = {}, {}
        per_adapter = adapter_bytes(core, 16)
        for distinct in (1, 16, 64 if n_req == 64 else 16):
            params = [base.with_updates(adapter_id=keys[i % distinct]) for i in range(n_req)]
            res["d"][distinct] = run(core, prompts, params)["tok_s"] / r0["tok_s"]
            # the base run with every decode step reading the step's adapters once at copy
            # bandwidth, and the adapters' prefill work free
            extra_s = (new - 1) * distinct * per_adapter / bw
            res["d_bound"][distinct] = r0["wall"] / (r0["wall"] + extra_s)
            print(
                f"(d) {distinct} distinct rank-16 adapters: {res['d'][distinct]:.2f}x base "
                f"(bound {res['d_bound'][distinct]:.3f}x: {distinct} x {per_adapter / 1e6:.1f} MB "
                "read a decode step at copy bandwidth, prefill free)",
                flush=True,
            )
    del core, hf8
    gc.unfreeze()  # heap.settle froze the engine's objects: their cycles would never be freed
    gc.collect()
    torch.cuda.empty_cache()


def batch_one(
    res: dict[str, Any], hf8: torch.nn.Module, core: EngineCore, wbytes: int, bw: float, n: int
) -> None:
    """(a): batch-1 decode against the roofline and HF ``generate``."""
    res["a_hf_tok_s"] = hf_generate_tok_s(hf8, n)
    core.overlap = False  # the same engine without asynchronous scheduling, for comparison
    res["a_ms_per_token_sync"] = batch1_ms_per_token(core)
    core.overlap = True
    ms = batch1_ms_per_token(core)
    res["a_ms_per_token"] = ms
    res["a_roofline_ms"] = 1e3 * wbytes / bw
    res["a_pct_roofline"] = 100 * res["a_roofline_ms"] / ms
    res["a_vs_hf"] = (1e3 / ms) / res["a_hf_tok_s"]
    print(
        f"(a) 8B batch-1: {ms:.2f} ms/token = {res['a_pct_roofline']:.0f}% of roofline "
        f"{res['a_roofline_ms']:.2f} ms; {1e3 / ms:.0f} tok/s vs HF generate "
        f"{res['a_hf_tok_s']:.0f} tok/s = {res['a_vs_hf']:.1f}x (without asynchronous "
        f"scheduling {res['a_ms_per_token_sync']:.2f} ms)",
        flush=True,
    )


C_REPEATS = 5
"""Repeats of (c); each k's ratio is taken against the k = 0 run of its own repeat."""


def alternatives(
    res: dict[str, Any], core: EngineCore, prompts: list[list[int]], base: SamplingParams
) -> None:
    """(c): k = 5 and 20 alternatives for every request against k = 0, ``C_REPEATS`` times;
    the worst repeat is the result (a stall in any one of them counts)."""
    ratios: dict[int, list[float]] = {5: [], 20: []}
    steps: dict[int, list[float]] = {5: [], 20: []}
    for _ in range(C_REPEATS):
        plain = run(core, prompts, [base] * len(prompts))
        for k in ratios:
            r = run(core, prompts, [base.with_updates(return_k_alternatives=k)] * len(prompts))
            ratios[k].append(r["tok_s"] / plain["tok_s"])
            steps[k].append(r["step_ms"] / plain["step_ms"])
    for k in ratios:
        res[f"c_k{k}_ratios"] = ratios[k]
        res[f"c_k{k}_ratio"] = min(ratios[k])
        res[f"c_k{k}_step_ratio"] = statistics.median(steps[k])
        print(
            f"(c) k={k}: worst of {C_REPEATS} {min(ratios[k]):.3f}x of k=0 (all: "
            f"{', '.join(f'{x:.3f}' for x in ratios[k])}; decode step median "
            f"{res[f'c_k{k}_step_ratio']:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
