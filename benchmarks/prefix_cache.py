"""Prefix caching: the same workloads with the cache on and off, measured in the same run.

    python benchmarks/prefix_cache.py [--reps 3]       # CPU, the default model
    python benchmarks/prefix_cache.py --gpu            # CUDA, a Llama-3-8B-shaped random model

CPU (targets from issue 16):
(a) a repeated 1,500-token prompt, max_new_tokens 1: cached time / cold time (target <= 1/5);
(b) /score's engine path (prompt logprobs, raw, one greedy token) for 16 continuations of a
    fresh 1,000-token context: time without the cache / with it (target >= 5x);
(c) chat: a shared 1,000-token system prompt, 32 users with ~40-token questions, 16 new tokens
    each, all at once: throughput with the cache / without it (target >= 2x).
GPU (``--gpu``): time to first token of a 4,000-token prompt whose first 3,900 tokens are
cached, against the same prompt cold (target <= 1/10).
Every number is a median over ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from truffula.engine.core import EngineCore
from truffula.sampling.params import SamplingParams

SCORE = SamplingParams(
    max_new_tokens=1, temperature=0.0, decoder_input_details=True, logprobs_mode="raw"
)


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1000, vocab - 1) for _ in range(n)]


def run(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> float:
    """Seconds until every request of ``prompts`` (all added at once) has finished."""
    t0 = time.perf_counter()
    pending = {core.add_request(p, params) for p in prompts}
    while pending:
        for out in core.step():
            if out.finished:
                pending.discard(out.request_id)
    return time.perf_counter() - t0


def median(f: object, reps: int) -> float:
    return statistics.median(f() for _ in range(reps))  # type: ignore[operator]


def cpu(reps: int) -> None:
    from common import machine

    from truffula.config import EngineConfig

    engines = {
        on: EngineCore(EngineConfig.from_kwargs(enable_prefix_caching=on), progress=False)
        for on in (True, False)
    }
    vocab = engines[True].vocab_size
    rng = random.Random(0)
    print(f"machine: {machine()}")
    one = SamplingParams(max_new_tokens=1, temperature=0.0)

    # (a) a repeated 1,500-token prompt
    prompt = tokens(rng, 1500, vocab)
    run(engines[True], [prompt], one)  # cached from here on
    hot = median(lambda: run(engines[True], [prompt], one), reps)
    cold = median(lambda: run(engines[False], [prompt], one), reps)
    print(
        f"(a) 1,500-token prompt: cold {cold * 1e3:.0f} ms, cached {hot * 1e3:.0f} ms, "
        f"ratio {hot / cold:.3f} (target <= 0.2)"
    )

    # (b) /score: 16 continuations of a fresh 1,000-token context
    def score(on: bool) -> float:
        ctx = tokens(rng, 1000, vocab)
        return run(engines[on], [ctx + tokens(rng, 8, vocab) for _ in range(16)], SCORE)

    s_on, s_off = median(lambda: score(True), reps), median(lambda: score(False), reps)
    print(
        f"(b) /score 16 x 1,000-token context: off {s_off:.2f} s, on {s_on:.2f} s, "
        f"speed-up {s_off / s_on:.1f}x (target >= 5x)"
    )

    # (c) chat: a shared 1,000-token system prompt, 32 users
    chat = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)

    def users(on: bool) -> float:
        system = tokens(rng, 1000, vocab)
        return (
            32 * 16 / run(engines[on], [system + tokens(rng, 40, vocab) for _ in range(32)], chat)
        )

    c_on, c_off = median(lambda: users(True), reps), median(lambda: users(False), reps)
    print(
        f"(c) chat, 32 users: off {c_off:.1f} tok/s, on {c_on:.1f} tok/s, "
        f"ratio {c_on / c_off:.1f}x (target >= 2x)"
    )


def gpu(reps: int, profile: bool = False) -> None:
    """TTFT of a 4,000-token prompt with a cached 3,900-token prefix against cold (CUDA)."""
    import gpu as g  # benchmarks/gpu.py: imported here so the CPU mode needs no CUDA

    hf, folder = g.build(g.LLAMA3_8B)
    core = g.engine_for(folder, hf, kv_cache_memory=8 << 30, max_num_batched_tokens=8192)
    rng = random.Random(0)
    vocab = core.vocab_size
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    run(core, [tokens(rng, 64, vocab)], one)  # warm-up
    cold, hot = [], []
    for _ in range(reps):
        prefix = tokens(rng, 3900, vocab)
        cold.append(run(core, [prefix + tokens(rng, 100, vocab)], one))
        hot.append(run(core, [prefix + tokens(rng, 100, vocab)], one))
    c, h = statistics.median(cold), statistics.median(hot)
    print(
        f"GPU 8B shape, 4,000-token prompt: cold TTFT {c * 1e3:.1f} ms, "
        f"3,900 cached {h * 1e3:.1f} ms, ratio {h / c:.3f} (target <= 0.1)"
    )
    if profile:  # where the time of a cached request goes, host and device
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        prefix = tokens(rng, 3900, vocab)
        run(core, [prefix + tokens(rng, 100, vocab)], one)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(core, [prefix + tokens(rng, 100, vocab)], one)
        table = prof.key_averages()
        print(table.table(sort_by="cpu_time_total", row_limit=40))
        print(table.table(sort_by="self_cuda_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="the CUDA TTFT case (8B shape)")
    ap.add_argument("--profile", action="store_true", help="--gpu: the profiler's tables of a hit")
    args = ap.parse_args()
    gpu(args.reps, args.profile) if args.gpu else cpu(args.reps)


if __name__ == "__main__":
    main()
