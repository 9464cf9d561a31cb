"""CPU decode throughput on the default model, against HF transformers ``generate`` and
llama-cpp-python (on the Q4_1 GGUF truffula's default model is dequantized from), same run.

    python benchmarks/throughput.py [--repeats 5] [--new 64] [--no-llama-cpp]

64 prompt tokens, ``--new`` generated, ignore_eos, greedy. Every configuration runs once per
repeat, configurations interleaved, on fresh random prompts each repeat (no prefix-cache hits);
tok/s count every generated token over the whole wall time, prefill included, for every peer;
medians over repeats. truffula rows:

- default flags (fp32): single stream, 8 and 32 concurrent requests, and single stream with 5
  alternatives per token (``details``, ``return_k_alternatives=5``);
- ``--quantization int8``, and ``--dtype bfloat16 --quantization int8`` (the fastest setting):
  single stream, with and without 5 alternatives.

Peers: HF batch 1 and batch 8 (fp32); llama-cpp-python batch 1 through ``create_completion``,
with ``logprobs=None`` and ``logprobs=5`` (which needs ``logits_all=True``; both instances are
loaded), ``n_threads`` = torch's thread count (truffula's). Skipped with a note when
llama-cpp-python is not installed (it is a benchmark-only dependency: see ``llama_cpp_peer``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import llama_cpp_peer
import torch
from common import greedy, hf_model, hf_tok_s, machine, random_prompts, write_result

from truffula.engine.llm import LLM

SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8": {"quantization": "int8"},
    "bf16+int8": {"dtype": "bfloat16", "quantization": "int8"},
    "bf16+int4": {"dtype": "bfloat16", "quantization": "int4"},
}
"""truffula engines (LLM options) by label; fp32 is the default."""


def ours_tok_s(llm: LLM, prompts: list[list[int]], new: int, k: int = 0) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, greedy(new, k))
    elapsed = time.perf_counter() - start
    if k:
        assert all(len(t.alternatives or ()) == k for o in outs for t in o.tokens)
    return sum(len(o.token_ids) for o in outs) / elapsed


def configs(
    engines: dict[str, LLM], hf: Any, lcpp: dict[str, Any], new: int
) -> dict[str, Callable[[list[list[int]]], float]]:
    """Label -> run on one repeat's prompts (tok/s); the order of one repeat."""
    fp32 = engines["fp32"]
    runs: dict[str, Callable[[list[list[int]]], float]] = {
        "HF batch 1": lambda p: hf_tok_s(hf, p[:1], new),
        "HF batch 8": lambda p: hf_tok_s(hf, p[:8], new),
        "truffula fp32, 8 concurrent": lambda p: ours_tok_s(fp32, p[:8], new),
        "truffula fp32, 32 concurrent": lambda p: ours_tok_s(fp32, p[:32], new),
    }
    for label, llm in engines.items():
        runs[f"truffula {label}, 1"] = lambda p, llm=llm: ours_tok_s(llm, p[:1], new)
        runs[f"truffula {label}, 1, k=5"] = lambda p, llm=llm: ours_tok_s(llm, p[:1], new, 5)
    if "plain" in lcpp:
        runs["llama-cpp-python, 1"] = lambda p: llama_cpp_peer.tok_s(lcpp["plain"], p[0], new, None)
        runs["llama-cpp-python, 1, logprobs=5"] = lambda p: llama_cpp_peer.tok_s(
            lcpp["logits_all"], p[0], new, 5
        )
    return runs


RATIOS = [
    ("truffula fp32, 1", "HF batch 1"),
    ("truffula fp32, 8 concurrent", "HF batch 8"),
    ("truffula fp32, 32 concurrent", "HF batch 8"),
    *((f"truffula {s}, 1", "HF batch 1") for s in SETTINGS if s != "fp32"),
    *((f"truffula {s}, 1", "llama-cpp-python, 1") for s in SETTINGS),
    *((f"truffula {s}, 1, k=5", "llama-cpp-python, 1, logprobs=5") for s in SETTINGS),
]
"""(row, peer) pairs printed as ratios of medians."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama-cpp-python peer")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    engines = {
        label: LLM(progress=False, max_num_seqs=64, **opts) for label, opts in SETTINGS.items()
    }
    hf = hf_model(engines["fp32"].engine.model_folder)
    lcpp: dict[str, Any] = {}
    if not args.no_llama_cpp:
        plain = llama_cpp_peer.load(threads, logits_all=False)
        if plain is not None:
            lcpp = {"plain": plain, "logits_all": llama_cpp_peer.load(threads, logits_all=True)}
    runs = configs(engines, hf, lcpp, args.new)
    warm = random_prompts(32, 64, seed=1000)
    for run in runs.values():  # warm-up: first calls, kernel choices, allocations
        run(warm)
    results: dict[str, list[float]] = {label: [] for label in runs}
    for rep in range(args.repeats):
        prompts = random_prompts(32, 64, seed=rep)
        for label, run in runs.items():
            results[label].append(run(prompts))
    med = {label: statistics.median(v) for label, v in results.items()}
    print(f"machine: {machine()}; llama-cpp-python {llama_cpp_peer.version() or 'not installed'}")
    print(f"{'configuration':<36} {'tok/s':>8}   runs")
    for label, v in results.items():
        print(f"{label:<36} {med[label]:>8.1f}   {' '.join(f'{x:.1f}' for x in v)}")
    ratios = {f"{a} / {b}": med[a] / med[b] for a, b in RATIOS if a in med and b in med}
    for name, r in ratios.items():
        print(f"{name:<70} {r:>6.2f}x")
    write_result(
        "throughput",
        {
            "command": "python benchmarks/throughput.py",
            "threads": threads,
            "llama_cpp_python": llama_cpp_peer.version(),
            "new_tokens": args.new,
            "median_tok_s": med,
            "runs": results,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
