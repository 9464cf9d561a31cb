"""Prefill of one long prompt on CUDA, against HF transformers' forward on the same weights.

    python benchmarks/prefill.py [--lengths 2048,8192,16384,32768] [--repeats 3] [--out DIR]

The Llama-3-8B shape of ``benchmarks/gpu.py`` (random bf16 weights, positions raised to hold the
longest prompt). For each length L: one prompt of L tokens with ``max_new_tokens`` 1, served by
an engine with the default step budget (8,192 tokens on CUDA, so prompts past it are prefilled
in chunks that attend to the cache), timed from ``add_request`` to its output; HF: one forward
of the whole prompt (``sdpa`` attention, logits of the last position only). Medians of
``--repeats``. MFU is model FLOPs over time against the bf16 dense peak (``PEAK_TFLOPS``):
2 x L x the parameters of every linear layer including the LM head (the usual count of model
FLOPs per token, though both truffula and HF compute the logits of the last position only),
plus causal attention, 2 x L^2 x heads x head_dim per layer (half of QK^T's and PV's square).
Without the LM head's share (1/14 of the linears' at this shape) every MFU is 0.93x as large;
the ratio to HF does not depend on the count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import gpu  # benchmarks/gpu.py
import torch

from truffula.config import EngineConfig
from truffula.engine.core import EngineCore
from truffula.sampling.params import SamplingParams

LENGTHS = (2048, 8192, 16384, 32768)
PEAK_TFLOPS = 989.0
"""H100/H200 SXM bf16 dense peak."""


def flops(hf: torch.nn.Module, length: int) -> float:
    layers = hf.model.layers
    params = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
    params += hf.lm_head.weight.numel()
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * length * length * cfg.num_attention_heads * head_dim * len(layers)
    return 2 * length * params + attn


def engine_ttft(core: EngineCore, prompt: list[int]) -> float:
    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    core.add_request(prompt, one)
    while core.has_work():
        core.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.inference_mode()
def hf_forward(hf: torch.nn.Module, prompt: list[int]) -> float:
    ids = torch.tensor([prompt], device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf(ids, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def sweep(hf: torch.nn.Module, folder: Path, lengths: list[int], repeats: int) -> dict[str, Any]:
    """TTFT and MFU of the engine and of HF at each length (the model must hold the longest)."""
    cfg = EngineConfig.from_kwargs(
        model=str(folder),
        device="cuda",
        dtype="bfloat16",
        max_model_len=max(lengths) + 16,
        kv_cache_memory=(max(lengths) // 4096 + 2) << 30,
        enable_prefix_caching=False,
    )
    core = EngineCore(cfg, progress=False, weights=hf.state_dict())
    budget = core.config.scheduler.max_num_batched_tokens
    g = torch.Generator().manual_seed(0)
    res: dict[str, Any] = {"step_budget": budget, "peak_tflops": PEAK_TFLOPS}
    for n in lengths:
        prompt = torch.randint(10, hf.config.vocab_size - 1, (n,), generator=g).tolist()
        engine_ttft(core, prompt)  # compiles this length's kernels
        hf_forward(hf, prompt)
        ours = statistics.median(engine_ttft(core, prompt) for _ in range(repeats))
        theirs = statistics.median(hf_forward(hf, prompt) for _ in range(repeats))
        f = flops(hf, n)
        row = {
            "ttft_s": ours,
            "hf_s": theirs,
            "mfu": f / ours / PEAK_TFLOPS / 1e12,
            "hf_mfu": f / theirs / PEAK_TFLOPS / 1e12,
            "vs_hf": theirs / ours,
        }
        res[str(n)] = row
        print(
            f"(f) prefill {n:>6} tokens: {1e3 * ours:8.1f} ms, {row['mfu']:.1%} MFU; HF forward "
            f"{1e3 * theirs:8.1f} ms, {row['hf_mfu']:.1%} MFU; {row['vs_hf']:.2f}x HF",
            flush=True,
        )
    del core
    torch.cuda.empty_cache()
    return res


def run(lengths: tuple[int, ...] | list[int], repeats: int) -> dict[str, Any]:
    """The 8B shape built to hold the longest prompt, then ``sweep``."""
    hf, folder = gpu.build(dict(gpu.LLAMA3_8B, max_position_embeddings=max(lengths) + 16))
    res = sweep(hf, folder, list(lengths), repeats)
    del hf
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    res.update(run(lengths, args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
