"""Quantized weights on one NVIDIA GPU against bf16, every number from the same run.

    python benchmarks/quantized_gpu.py [--methods fp8,int4] [--quick] [--out DIR]

The Llama-3-8B shape of ``benchmarks/gpu.py`` (random bf16 weights; ``--quick``: the 1B shape):

(g) the linear kernels alone, one row, per 8B projection shape: microseconds and the share of
    the weight-read roofline (weight bytes over the measured copy bandwidth), bf16 against each
    quantized format (fp8; int4 in groups of 128), and the fp8 GEMV's tile configurations
    side by side; int4 against bf16 at 64 and 512 rows too, and fp8 at 64 rows (the Triton
    GEMM's tiles and ``_scaled_mm``, each with the activations' quantization);
(a) batch-1 decode ms/token for bf16 and each ``--quantization`` method, each against its own
    weight roofline (fp8: one byte per projection weight; the LM head and norms stay bf16);
(b) 64 concurrent requests, 512 in / 128 out: output tok/s and the ratio to bf16.

Targets (issue: bring your own model): fp8 batch-1 >= 1.7x bf16 and >= 80% of its roofline,
int4 batch-1 >= 2.5x bf16, 64 concurrent >= 1.2x bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import without_out  # noqa: E402
from gpu import (  # noqa: E402
    LLAMA3_8B,
    LLAMA32_1B,
    batch1_ms_per_token,
    build,
    engine_for,
    measure_bandwidth,
    run,
)

from truffula.kernels import (  # noqa: E402
    linear_triton,
    quant_fp8,
    quant_fp8_triton,
    quant_int4,
    quant_int4_triton,
)
from truffula.layers.linear import Linear  # noqa: E402
from truffula.sampling.params import SamplingParams  # noqa: E402

FP8_CANDIDATES = [(16, 512, 4, 3), (8, 1024, 8, 4), (4, 2048, 4, 4), (8, 512, 4, 4)]
"""fp8 GEMV tiles timed beside the chosen one: three with twice the 16-bit tiles' columns (as
many bytes a step), and the 16-bit tile of the 6,144-row class."""
INT4_CANDIDATES = [(8, 4, 4, 3), (8, 8, 4, 3), (16, 4, 4, 3), (16, 8, 8, 3), (32, 2, 8, 3)]
"""int4 GEMV tiles (rows, groups of 128 a step, warps, stages) timed beside the chosen one."""
INT4_GEMM_CANDIDATES = [(64, 4, 3), (32, 4, 3), (32, 4, 4), (16, 2, 4), (16, 4, 3)]
"""int4 GEMM tiles (weight rows a program, warps, stages) timed at 64 rows of x."""
FP8_GEMM_CANDIDATES = [(32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4)]
"""fp8 GEMM tiles (weight rows a program, columns a step, warps, stages) timed at 64 rows of
x, the activations' quantization included."""


def kernel_time_us(fn: Any, copies: int, iters: int = 48) -> float:
    """Microseconds per call of ``fn(i)`` (i picks one of ``copies`` weights, so that repeated
    calls do not read the same bytes from L2): ``iters`` calls captured in a CUDA graph, so
    no launch gap counts; median of 7 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def one_shape(n: int, k: int, bw: float) -> dict[str, Any]:
    """One-row bf16 and fp8 GEMV times for an [n, k] weight, each fp8 tile configuration."""
    copies = max(2, -(-(400 << 20) // (n * k * 2)))  # 400 MB of bf16 weights: L2 holds 50
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    qs = [quant_fp8.quantize(w) for w in ws]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    row: dict[str, Any] = {
        "bf16_us": kernel_time_us(lambda i: linear_triton.gemv(x, ws[i], None), copies)
    }
    row["bf16_roof_pct"] = 100 * (n * k * 2 / bw * 1e6) / row["bf16_us"]
    for cfg in [*FP8_CANDIDATES, linear_triton._config(n)]:
        us = kernel_time_us(
            lambda i, c=cfg: linear_triton.gemv(x, qs[i][0], None, qs[i][1], c), copies
        )
        row[f"fp8_{'x'.join(map(str, cfg))}_us"] = us
    row["fp8_chosen_us"] = kernel_time_us(
        lambda i: quant_fp8_triton.linear(x, qs[i][0], qs[i][1], qs[i][1][None], None), copies
    )
    row["fp8_roof_pct"] = 100 * (n * k / bw * 1e6) / row["fp8_chosen_us"]
    w4s = [quant_int4.quantize(w) for w in ws]
    for cfg in INT4_CANDIDATES:
        row[f"int4_{'x'.join(map(str, cfg))}_us"] = kernel_time_us(
            lambda i, c=cfg: quant_int4_triton.linear(x, w4s[i], None, c), copies
        )
    row["int4_us"] = kernel_time_us(lambda i: quant_int4_triton.linear(x, w4s[i], None), copies)
    int4_bytes = n * k / 2 + 2 * w4s[0].scale.numel() * 4
    row["int4_roof_pct"] = 100 * (int4_bytes / bw * 1e6) / row["int4_us"]
    x64 = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    for gemm in INT4_GEMM_CANDIDATES:
        row[f"rows64_int4_{'x'.join(map(str, gemm))}_us"] = kernel_time_us(
            lambda i, c=gemm: quant_int4_triton.linear(x64, w4s[i], None, gemm_config=c),
            copies,
            iters=8,
        )
    for c in FP8_GEMM_CANDIDATES:
        row[f"rows64_fp8_{'x'.join(map(str, c))}_us"] = kernel_time_us(
            lambda i, c=c: quant_fp8_triton.gemm(
                *quant_fp8_triton.quantize_rows(x64), qs[i][0], qs[i][1], None, x64.dtype, c
            ),
            copies,
            iters=8,
        )
    row["rows64_fp8_us"] = kernel_time_us(
        lambda i: quant_fp8_triton.linear(x64, qs[i][0], qs[i][1], qs[i][1][None], None),
        copies,
        iters=8,
    )

    def scaled_mm(i: int) -> torch.Tensor:  # the path above 64 rows, at 64
        xq, xs = quant_fp8_triton.quantize_rows(x64)
        return torch._scaled_mm(
            xq, qs[i][0].t(), scale_a=xs, scale_b=qs[i][1][None], out_dtype=x64.dtype
        )

    row["rows64_fp8_scaled_mm_us"] = kernel_time_us(scaled_mm, copies, iters=8)
    for m in (64, 512):  # decode of 64 (the in-register GEMM), a prefill chunk (dequantized)
        xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row[f"rows{m}_bf16_us"] = kernel_time_us(
            lambda i, xm=xm: torch.nn.functional.linear(xm, ws[i]), copies, iters=8
        )
        row[f"rows{m}_int4_us"] = kernel_time_us(
            lambda i, xm=xm: quant_int4_triton.linear(xm, w4s[i], None), copies, iters=8
        )
    return row


def linear_sweep(shape: dict[str, Any], bw: float) -> dict[str, Any]:
    """(g): one-row kernels per projection shape of ``shape``."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // heads
    shapes = {
        "qkv": ((heads + 2 * kv) * d, h),
        "o": (h, h),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
    }
    out: dict[str, Any] = {}
    for name, (n, k) in shapes.items():
        row = one_shape(n, k, bw)
        out[f"{name} {n}x{k}"] = row
        configs = ", ".join(f"{c[:-3]} {v:.1f}" for c, v in row.items() if c.count("x") >= 3)
        print(
            f"(g) {name:8s} {n}x{k}: bf16 {row['bf16_us']:.1f} us ({row['bf16_roof_pct']:.0f}% "
            f"of roofline); fp8 {row['fp8_chosen_us']:.1f} us ({row['fp8_roof_pct']:.0f}%); "
            f"int4 {row['int4_us']:.1f} us ({row['int4_roof_pct']:.0f}%); 64 / 512 rows: bf16 "
            f"{row['rows64_bf16_us']:.1f} / {row['rows512_bf16_us']:.1f}, int4 "
            f"{row['rows64_int4_us']:.1f} / {row['rows512_int4_us']:.1f} us; 64 rows fp8 "
            f"{row['rows64_fp8_us']:.1f} us (_scaled_mm {row['rows64_fp8_scaled_mm_us']:.1f}); "
            f"tiles (us): {configs}",
            flush=True,
        )
    return out


def model_bytes(core: Any) -> int:
    """Bytes a decode step reads: every parameter and quantized weight but the input embedding
    (only gathered), unless the LM head is tied to it."""
    total = 0
    emb = None
    for name, p in core.runner.model.named_parameters():
        if "embed_tokens" in name:
            emb = p
        else:
            total += p.numel() * p.element_size()
    heads = [m for n, m in core.runner.model.named_modules() if n.endswith("lm_head")]
    if emb is not None and heads and heads[0].weight.data_ptr() == emb.data_ptr():
        total += emb.numel() * emb.element_size()
    for m in core.runner.model.modules():
        if isinstance(m, Linear) and m.qweight is not None:
            total += m.qweight.numel() * m.qweight.element_size()
        if isinstance(m, Linear) and m.int4 is not None:  # and its group scales and minima
            total += 2 * m.int4.scale.numel() * m.int4.scale.element_size()
    return total


def profile_steps(core: Any, prompts: list[list[int]]) -> str:
    """The profiler's kernel table over 8 decode steps of ``prompts`` decoding together."""
    from torch.profiler import ProfilerActivity, profile

    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    for ids in prompts:
        core.add_request(ids, p)
    while any(r.num_pending > 1 for r in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(4):
        core.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            core.step()
        torch.cuda.synchronize()
    for rid in list(core.requests):
        core.abort(rid)
    core.step()
    return str(
        prof.key_averages().table(
            sort_by="device_time_total", row_limit=12, max_name_column_width=70
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="fp8,int4", help="comma-separated --quantization methods")
    ap.add_argument("--quick", action="store_true", help="the 1B shape, 16 requests")
    ap.add_argument("--skip-kernels", action="store_true", help="skip (g)")
    ap.add_argument("--profile", action="store_true", help="kernel tables of decode steps")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = LLAMA32_1B if args.quick else LLAMA3_8B
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/quantized_gpu.py", *without_out(sys.argv[1:])]),
    }
    bw = measure_bandwidth()
    res["copy_bw_GBs"] = bw / 1e9
    print(f"device {res['device']}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if not args.skip_kernels:
        res["g_kernels"] = linear_sweep(shape, bw)

    n_req, new = (16, 32) if args.quick else (64, 128)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (512,), generator=gen).tolist() for _ in range(n_req)]
    base = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    hf, folder = build(shape)
    results: dict[str, dict[str, float]] = {}
    for method in ["bf16", *args.methods.split(",")]:
        quant = None if method == "bf16" else method
        core = engine_for(
            folder,
            hf,
            quantization=quant,
            enable_prefix_caching=False,
            max_num_seqs=n_req,
            kv_cache_memory=12 << 30,
        )
        r: dict[str, float] = {"bytes": model_bytes(core)}
        r["roofline_ms"] = 1e3 * r["bytes"] / bw
        r["ms_per_token"] = batch1_ms_per_token(core)
        r["pct_roofline"] = 100 * r["roofline_ms"] / r["ms_per_token"]
        run(core, prompts, [base] * n_req, warm=False)  # burn-in at full size
        b = run(core, prompts, [base] * n_req)
        r["b_tok_s"], r["b_step_ms"] = b["tok_s"], b["step_ms"]
        results[method] = r
        if args.profile:
            for conc in (1, n_req):
                print(f"== {method}, {conc} decoding:\n" + profile_steps(core, prompts[:conc]))
        ref = results["bf16"]
        print(
            f"{method}: (a) batch-1 {r['ms_per_token']:.2f} ms/token = {r['pct_roofline']:.0f}% of "
            f"its roofline {r['roofline_ms']:.2f} ms, {ref['ms_per_token'] / r['ms_per_token']:.2f}x "
            f"bf16; (b) {n_req} concurrent {r['b_tok_s']:.0f} tok/s = "
            f"{r['b_tok_s'] / ref['b_tok_s']:.2f}x bf16 (decode step {r['b_step_ms']:.2f} ms)",
            flush=True,
        )
        del core
        gc.collect()
        torch.cuda.empty_cache()
    res["methods"] = results
    (out_dir / "quantized_gpu.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
