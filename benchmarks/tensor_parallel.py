"""Tensor parallelism on NVIDIA GPUs: the same engine at 1 and 2 ranks, in one run.

    python benchmarks/tensor_parallel.py [--quick] [--shapes 8b,70b] [--out FILE]

Models have random bf16 weights (``--load-format dummy``: no checkpoint is read) and a small
trained tokenizer. Each configuration runs in a process of its own, one after another.

(a) Llama-3-8B shape, TP 1 and TP 2 (with CUDA graphs; ``--eager``: TP 2 without): batch-1 decode
    ms/token against the per-GPU weight roofline (weight bytes / ranks over the measured copy
    bandwidth); target TP 2 <= 0.6x TP 1.
(b) the same engines, 64 concurrent requests, 512 in / 128 out: output tok/s; target TP 2
    >= 1.6x TP 1.
(c) a Llama-3-70B shape (80 layers, hidden 8192, 64 heads, 8 KV heads) at TP 2: batch-1
    ms/token against its per-GPU roofline; 64 concurrent requests with k = 20 alternatives
    over 16 distinct rank-16 adapters, beside the same requests with k = 0 and no adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu import (  # noqa: E402
    LLAMA3_8B,
    batch1_ms_per_token,
    measure_bandwidth,
    run,
    tokenizer_folder,
)

LLAMA3_70B = dict(
    LLAMA3_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B}


def weight_bytes(shape: dict[str, Any]) -> int:
    """bf16 bytes a decode step reads: every weight but the input embedding (only gathered)."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return 2 * (n * layer + h + shape["vocab_size"] * h)


def kv_bytes_per_token(shape: dict[str, Any]) -> int:
    d = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * d * 2


def model_folder(shape: dict[str, Any]) -> Path:
    from transformers import LlamaConfig

    folder = tokenizer_folder(shape["vocab_size"])
    config = LlamaConfig(**shape)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return folder


def one(spec: dict[str, Any]) -> None:
    """Measure one configuration (run in a process of its own)."""
    from common import random_adapters

    from truffula.config import EngineConfig
    from truffula.engine.core import EngineCore
    from truffula.sampling.params import SamplingParams

    shape = SHAPES[spec["shape"]]
    n_req, new = spec["requests"], spec["new"]
    cfg = EngineConfig.from_kwargs(
        model=str(model_folder(shape)),
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        tensor_parallel_size=spec["tp"],
        max_model_len=4096,
        enable_prefix_caching=False,
        max_num_seqs=64,
        kv_cache_memory=12 << 30,
        max_num_batched_tokens=4096,
        max_active_adapters=16,
        max_lora_rank=16,
        cuda_graph_max_batch=None if spec["graphs"] else 0,
    )
    t0 = time.perf_counter()
    core = EngineCore(cfg, progress=False)
    res: dict[str, Any] = {**spec, "start_s": time.perf_counter() - t0}
    res["ms_per_token"] = batch1_ms_per_token(core)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (512,), generator=gen).tolist() for _ in range(n_req)]
    base = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    run(core, prompts, [base] * n_req, warm=False)  # burn-in at full size
    r = run(core, prompts, [base] * n_req)
    res["tok_s"], res["step_ms"] = r["tok_s"], r["step_ms"]
    if spec.get("adapters"):
        keys = random_adapters(core.adapters, spec["adapters"], 16, 0.01, "cuda", torch.bfloat16)
        params = [
            base.with_updates(adapter_id=keys[i % len(keys)], return_k_alternatives=20)
            for i in range(n_req)
        ]
        r = run(core, prompts, params)
        res["k20_adapters_tok_s"], res["k20_adapters_step_ms"] = r["tok_s"], r["step_ms"]
    print(json.dumps(res), flush=True)
    core.ranks.close()
    os._exit(0)  # no interpreter teardown of the CUDA and NCCL state


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``one(spec)`` in a fresh process; its last line is the result."""
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired as exc:
        return {**spec, "error": f"timed out after {timeout:.0f} s", "log": str(exc.stderr)[-2000:]}
    if done.returncode != 0:
        return {**spec, "error": f"exit {done.returncode}", "log": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="16 requests of 32 new tokens")
    ap.add_argument("--shapes", default="8b,70b", help="which of 8b and 70b to run")
    ap.add_argument("--eager", action="store_true", help="8B at TP 2 without CUDA graphs too")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tensor-parallel-h200x2.json"))
    args = ap.parse_args()
    if args.one:
        one(json.loads(args.one))
        return
    n_req, new = (16, 32) if args.quick else (64, 128)
    bw = measure_bandwidth()
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
        "torch": torch.__version__,
        "copy_bw_GBs": bw / 1e9,
        "runs": [],
    }
    torch.cuda.empty_cache()
    common = {"requests": n_req, "new": new}
    shapes = args.shapes.split(",")
    specs = []
    if "8b" in shapes:
        specs += [
            {"shape": "8b", "tp": 1, "graphs": True, **common},
            {"shape": "8b", "tp": 2, "graphs": True, **common},
        ]
        if args.eager:
            specs.append({"shape": "8b", "tp": 2, "graphs": False, **common})
    if "70b" in shapes:
        specs.append({"shape": "70b", "tp": 2, "graphs": True, "adapters": 16, **common})
    for spec in specs:
        r = spawn(spec, args.timeout)
        shape = SHAPES[spec["shape"]]
        r["roofline_ms"] = 1e3 * weight_bytes(shape) / spec["tp"] / bw
        res["runs"].append(r)
        if "error" in r:
            print(f"{spec}: {r['error']}\n{r.get('log', '')}", flush=True)
            continue
        print(
            f"{spec['shape']} TP {spec['tp']}{'' if spec['graphs'] else ' eager'}: batch-1 "
            f"{r['ms_per_token']:.2f} ms/token ({100 * r['roofline_ms'] / r['ms_per_token']:.0f}% "
            f"of the per-GPU roofline {r['roofline_ms']:.2f} ms); {n_req} x 512/{new}: "
            f"{r['tok_s']:.0f} tok/s, step {r['step_ms']:.2f} ms (started in {r['start_s']:.0f} s)"
            + (
                f"; k=20 over {spec['adapters']} adapters: {r['k20_adapters_tok_s']:.0f} tok/s "
                f"({r['k20_adapters_tok_s'] / r['tok_s']:.2f}x)"
                if "k20_adapters_tok_s" in r
                else ""
            ),
            flush=True,
        )
    by = {(r["shape"], r["tp"], r["graphs"]): r for r in res["runs"] if "error" not in r}
    one_rank, two = by.get(("8b", 1, True)), by.get(("8b", 2, True))
    if one_rank and two:
        res["batch1_ratio"] = two["ms_per_token"] / one_rank["ms_per_token"]
        res["throughput_ratio"] = two["tok_s"] / one_rank["tok_s"]
        print(
            f"8B TP 2 / TP 1: batch-1 ms/token {res['batch1_ratio']:.2f}x (target <= 0.6x); "
            f"{n_req} concurrent throughput {res['throughput_ratio']:.2f}x (target >= 1.6x)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
