"""Speculative decoding's mechanism on CUDA: what verifying drafts costs and gains, same run.

    python benchmarks/speculative_gpu.py [--repeats 3] [--new 128] [--quick]

The Llama-3-8B-shaped model of ``benchmarks/gpu.py`` (``--quick``: the Llama-3.2-1B shape),
random bf16 weights: such a model repeats nothing, so prompt lookup would draft nothing of use
and the drafts come from an oracle put in place of the n-gram proposer. A first, plain run
records each prompt's greedy continuation; the oracle then proposes

- ``right``: the next tokens of that continuation (every draft the target would accept, as
  long as its greedy choice in the verify step equals the recorded one);
- ``wrong``: those tokens plus one (no draft accepted).

(a) Step cost: the median step with 4 drafted tokens per sequence (a verify step over 1 + 4
    tokens) against the median plain step (1 token), at batch 1 and 64, timed synchronously
    (misses never pause the drafts here).
(b) Single stream: tokens/s of plain decoding (``speculative: false``), ``right`` and ``wrong``
    drafts (with the engine's pause after a miss), interleaved over ``--repeats`` rounds of 4
    prompts; acceptance counted by the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gpu  # benchmarks/gpu.py
import numpy as np
import torch

from truffula.sampling.params import SamplingParams
from truffula.speculative import drafter as drafter_mod

K = 4
SPEC = {"method": "ngram", "num_speculative_tokens": K}


class Oracle:
    """Proposes from recorded greedy continuations, found by the prompt's first tokens."""

    def __init__(self, vocab: int) -> None:
        self.refs: dict[tuple[int, ...], list[int]] = {}
        self.vocab = vocab
        self.mode = "right"

    def record(self, prompt: list[int], output: list[int]) -> None:
        self.refs[tuple(prompt[:32])] = prompt + output

    def propose(self, history: Sequence[int] | np.ndarray, k: int, *_: int) -> list[int]:
        ref = self.refs.get(tuple(int(t) for t in history[:32]))
        if ref is None:
            return []
        n = len(history)
        nxt = ref[n : n + k]
        return nxt if self.mode == "right" else [(t + 1) % self.vocab for t in nxt]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def generate(
    core: gpu.EngineCore, batch: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    ids = [core.add_request(p, params) for p in batch]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while core.has_work():
        for o in core.step():
            out[o.request_id] += [t.id for t in o.tokens]
    return [out[i] for i in ids]


def timed_steps(core: gpu.EngineCore, n: int) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        core.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def step_cost(core: gpu.EngineCore, oracle: Oracle, batch: int, vocab: int) -> dict[str, float]:
    """Median step (ms) of ``batch`` decoding sequences, plain and verifying K drafts each."""
    res = {}
    ps = prompts(batch, 128, vocab, seed=batch)
    long = SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True)
    for p, out in zip(ps, generate(core, ps, long.with_updates(speculative=False)), strict=True):
        oracle.record(p, out)
    for name, spec in (("plain_ms", False), ("verify_ms", True)):
        for p in ps:
            core.add_request(p, long.with_updates(speculative=spec))
        for _ in range(4):  # prefill and the first decodes
            core.step()
        res[name] = timed_steps(core, 20)
        for rid in list(core.requests):
            core.abort(rid)
        while core.has_work():
            core.step()
    res["ratio"] = res["verify_ms"] / res["plain_ms"]
    return res


def single_stream(
    core: gpu.EngineCore, oracle: Oracle, new: int, repeats: int, vocab: int
) -> dict[str, object]:
    plain = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    ps = prompts(4, 256, vocab, seed=7)
    for p in ps:
        oracle.record(p, generate(core, [p], plain.with_updates(speculative=False))[0])
    drafter = core.drafter
    runs: dict[str, list[float]] = {"plain": [], "right": [], "wrong": []}
    counts = {m: [0, 0] for m in ("right", "wrong")}
    for _ in range(repeats):
        for mode in runs:
            oracle.mode = mode
            d0, a0 = drafter.drafted, drafter.accepted
            t = time.perf_counter()
            n = sum(
                len(generate(core, [p], plain.with_updates(speculative=mode != "plain"))[0])
                for p in ps
            )
            runs[mode].append(n / (time.perf_counter() - t))
            if mode in counts:
                counts[mode][0] += drafter.drafted - d0
                counts[mode][1] += drafter.accepted - a0
    med = {m: statistics.median(v) for m, v in runs.items()}
    return {
        "tok_s": med,
        "runs": runs,
        "right_x": med["right"] / med["plain"],
        "wrong_x": med["wrong"] / med["plain"],
        "drafted_accepted": counts,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (b)")
    ap.add_argument("--new", type=int, default=128, help="tokens per stream in (b)")
    ap.add_argument("--quick", action="store_true", help="the 1B shape")
    ap.add_argument("--out", default="bench-out")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    hf, folder = gpu.build_8b(args.quick)
    core = gpu.engine_for(
        folder,
        hf,
        speculative=json.dumps(SPEC),
        enable_prefix_caching=False,
        max_num_seqs=64,
        kv_cache_memory=16 << 30,
    )
    vocab = core.vocab_size
    oracle = Oracle(vocab)
    propose: Callable[..., list[int]] = drafter_mod.ngram.propose
    drafter_mod.ngram.propose = oracle.propose  # type: ignore[assignment]
    res: dict[str, object] = {"device": torch.cuda.get_device_name(), "k": K}
    try:
        generate(core, prompts(2, 64, vocab, 0), SamplingParams(max_new_tokens=8))  # warm-up
        verified, served = core.drafter.verified, core.overlap
        core.drafter.verified = lambda rid, d, a: None  # type: ignore[method-assign]
        core.overlap = False  # each step timed alone
        for batch in (1, 64):
            r = step_cost(core, oracle, batch, vocab)
            res[f"batch{batch}"] = r
            print(
                f"(a) batch {batch}: plain step {r['plain_ms']:.2f} ms, verify 1+{K} "
                f"{r['verify_ms']:.2f} ms ({r['ratio']:.2f}x)",
                flush=True,
            )
        core.drafter.verified = verified  # type: ignore[method-assign]
        core.overlap = served  # as served: a speculating engine does not overlap its steps
        s = single_stream(core, oracle, args.new, args.repeats, vocab)
        res["single"] = s
        tok = s["tok_s"]
        assert isinstance(tok, dict)
        print(
            f"(b) single stream, {args.new} new tokens: plain {tok['plain']:.1f} tok/s, "
            f"right drafts {tok['right']:.1f} ({s['right_x']:.2f}x), wrong drafts "
            f"{tok['wrong']:.1f} ({s['wrong_x']:.2f}x); drafted/accepted {s['drafted_accepted']}",
            flush=True,
        )
    finally:
        drafter_mod.ngram.propose = propose  # type: ignore[assignment]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["date"] = time.strftime("%Y-%m-%d")
    (out / "speculative_gpu.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
