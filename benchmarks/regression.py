"""The engine's core numbers of ``benchmarks/gpu.py``, short, for comparing two checkouts.

    cd <checkout> && python <this checkout>/benchmarks/regression.py [--repeats 3] [--cpu]

Runs against the truffula of the current directory (``benchmarks/`` and ``truffula/`` there),
so one invocation per checkout, alternated by the caller, compares code versions on the same
machine in the same session; prints one JSON line.

CUDA (the Llama-3-8B shape of ``gpu.py``): (a) batch-1 ms per token, (b) 64 requests of 512
prompt tokens and 128 new ones, output tok/s, (c) the same with k = 20 alternatives for all.
``--cpu``: the default model, single stream and 32 concurrent requests of 64 new tokens
(``--k`` alternatives each), output tok/s. Medians of ``--repeats``. ``--option KEY=INT`` adds an engine option (CUDA; e.g.
``max_prefill_while_decoding=0``, to compare with a checkout that had no such setting).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def cuda(repeats: int, options: dict[str, Any]) -> dict[str, float]:
    import gpu  # the checkout's benchmarks/gpu.py
    import torch

    from truffula.sampling.params import SamplingParams

    if options:  # engine options beside gpu.py's own (engine_8b reads the module's engine_for)
        gpu.engine_for = functools.partial(gpu.engine_for, **options)

    hf, folder = gpu.build(gpu.LLAMA3_8B)
    core = gpu.engine_8b(folder, hf)
    # as a server's engine process does after start-up (truffula/heap.py), in both checkouts:
    # else a full collection walking the HF model and the engine (~220 ms on the H200 host)
    # lands in one timed run or another
    gc.collect()
    gc.freeze()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (512,), generator=gen).tolist() for _ in range(64)]
    base = SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True)
    k20 = base.with_updates(return_k_alternatives=20)
    gpu.run(core, prompts, [base] * 64, warm=False)  # burn-in at full size
    res = {"a_ms_per_token": gpu.batch1_ms_per_token(core)}
    b, c = [], []
    for _ in range(repeats):  # interleaved
        b.append(gpu.run(core, prompts, [base] * 64)["tok_s"])
        c.append(gpu.run(core, prompts, [k20] * 64)["tok_s"])
    res["b_tok_s"], res["c_k20_tok_s"] = statistics.median(b), statistics.median(c)
    return res


def cpu(repeats: int, k: int) -> dict[str, float]:
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(progress=False, max_num_seqs=32)
    p = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True, return_k_alternatives=k)

    def tok_s(n: int, seed: int) -> float:
        prompts = [f"Request {seed}-{i}: write about the sea." for i in range(n)]
        t = time.perf_counter()
        outs = llm.generate(prompts, p)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

    tok_s(2, -1)  # warm-up
    one, many = [], []
    for r in range(repeats):
        one.append(tok_s(1, 2 * r))
        many.append(tok_s(32, 2 * r + 1))
    return {"single_tok_s": statistics.median(one), "c32_tok_s": statistics.median(many)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--option", action="append", default=[], help="KEY=INT engine option")
    ap.add_argument("--k", type=int, default=0, help="--cpu: alternatives per token")
    ap.add_argument("--label", help="the checkout's name in the output (default: its folder's)")
    args = ap.parse_args()
    options = {k: int(v) for k, v in (o.split("=", 1) for o in args.option)}
    here = Path.cwd()
    sys.path[:0] = [str(here / "benchmarks"), str(here)]
    res = cpu(args.repeats, args.k) if args.cpu else cuda(args.repeats, options)
    print(json.dumps({"checkout": args.label or here.name, "options": options, **res}), flush=True)


if __name__ == "__main__":
    main()
