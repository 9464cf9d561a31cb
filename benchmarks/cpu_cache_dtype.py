"""A 16-bit model's KV cache on CPU in float32 (the default, ``runner.kv_cache.cache_dtype``)
against one in the model's dtype, in one process: single-stream decode of the default model with
``--dtype bfloat16 --quantization int4`` (the fastest CPU setting), without and with 5
alternatives per token, the two engines alternating (ABBA) over fresh prompts.

    python benchmarks/cpu_cache_dtype.py [--repeats 16] [--new 64]

Prints each side's median tok/s and the median of the paired ratios (float32 / bf16), and
checks that the greedy tokens are the same.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import greedy, machine, random_prompts, write_result

from truffula.engine.llm import LLM
from truffula.runner import kv_cache


def tok_s(llm: LLM, prompt: list[int], new: int, k: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    (out,) = llm.generate([prompt], greedy(new, k))
    return len(out.token_ids) / (time.perf_counter() - start), list(out.token_ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    chosen = kv_cache.cache_dtype
    engines: dict[str, LLM] = {}
    for label, fn in (("bf16", lambda device, dtype: dtype), ("float32", chosen)):
        kv_cache.cache_dtype = fn
        engines[label] = LLM(progress=False, dtype="bfloat16", quantization="int4")
    kv_cache.cache_dtype = chosen
    for llm in engines.values():  # warm-up
        for k in (0, 5):
            tok_s(llm, random_prompts(1, 64, seed=1000)[0], args.new, k)
    runs: dict[str, list[float]] = {f"{e}, k={k}": [] for e in engines for k in (0, 5)}
    same = True
    for rep in range(args.repeats):
        prompt = random_prompts(1, 64, seed=rep)[0]
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        tokens = {}
        for label in order:
            for k in (0, 5):
                rate, tokens[label, k] = tok_s(engines[label], prompt, args.new, k)
                runs[f"{label}, k={k}"].append(rate)
        same &= tokens["bf16", 0] == tokens["float32", 0]
    print(f"machine: {machine()}")
    result: dict[str, object] = {"runs": runs, "same_tokens": same}
    for k in (0, 5):
        a, b = runs[f"bf16, k={k}"], runs[f"float32, k={k}"]
        paired = statistics.median(y / x for x, y in zip(a, b, strict=True))
        wins = sum(y > x for x, y in zip(a, b, strict=True))
        result[f"k={k} paired ratio"] = paired
        print(
            f"k={k}: bf16 cache {statistics.median(a):.1f} tok/s, float32 cache "
            f"{statistics.median(b):.1f}; paired ratio {paired:.3f}x (float32 faster in {wins} "
            f"of {len(a)})"
        )
    print(f"same greedy tokens: {same}")
    write_result("cpu-cache-dtype", result)


if __name__ == "__main__":
    main()
