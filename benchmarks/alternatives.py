"""The cost of token probabilities on CPU with the default model.

    python benchmarks/alternatives.py [--repeats 9]

1. Decode throughput of 8 concurrent requests (64 in, 64 out, ignore_eos, greedy) with k = 0,
   5 and 20 alternatives for every request, and k = 20 for half of them, as ratios to k = 0
   measured in the same run (configurations interleaved; the median over repeats of each
   repeat's ratio, so drift of a shared machine cancels). The alternatives' text is
   materialized in the timed loop, as a server does when it answers.
2. Per-step cost of the reference system's approach (log-softmax, full sort and ``.tolist()``
   of [batch, vocab]) against truffula's sampler statistics (``stats_of_logits``: chosen
   logprob, rank, entropy, top-20, and the one copy of the results) on the same logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, random_prompts, write_result

from truffula.engine.llm import LLM
from truffula.kernels.stats_torch import stats_of_logits
from truffula.sampling.params import SamplingParams

CONFIGS = {"k=0": (0, 8), "k=5": (5, 8), "k=20": (20, 8), "k=20 half": (20, 4)}


def run(llm: LLM, prompts: list[list[int]], k: int, asking: int) -> float:
    params = [
        SamplingParams(
            max_new_tokens=64,
            temperature=0,
            ignore_eos=True,
            return_k_alternatives=k if i < asking else 0,
        )
        for i in range(len(prompts))
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    texts = sum(len(a.text) for o in outs for t in o.tokens for a in (t.alternatives or []))  # noqa: F841
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def step_costs(batch: int, vocab: int, repeats: int = 20) -> dict[str, float]:
    logits = torch.randn(batch, vocab) * 3
    chosen = logits.argmax(-1)

    def reference() -> None:  # LoRAX: log-softmax, full sort, whole matrix to Python lists
        lp = logits.log_softmax(-1)
        values, ids = torch.sort(lp, descending=True, stable=True)
        values.tolist()
        ids.tolist()

    def ours() -> None:
        ids, lps, ranks, ent = stats_of_logits(logits, chosen, 20)
        torch.cat(
            [ids.double().flatten(), lps.double().flatten(), ranks.double(), ent.double()]
        ).tolist()

    out = {}
    for name, fn in (("reference_ms", reference), ("truffula_ms", ours)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = 1e3 * statistics.median(times)
    out["speedup"] = out["reference_ms"] / out["truffula_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    llm = LLM(progress=False, max_k_alternatives=20)
    prompts = random_prompts(8, 64)
    run(llm, prompts[:2], 5, 2)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):  # interleaved, so drift of a shared machine hits all alike
        for name, (k, asking) in CONFIGS.items():
            samples[name].append(run(llm, prompts, k, asking))
    base = samples["k=0"]
    rows = {  # ratio: median over repeats of the ratio to k = 0 in the same repeat
        name: {
            "tok_s": statistics.median(v),
            "ratio": statistics.median(x / b for x, b in zip(v, base, strict=True)),
            "runs": v,
        }
        for name, v in samples.items()
    }
    costs = step_costs(8, llm.engine.vocab_size)
    print(f"machine: {machine()}")
    print(f"{'config':>10}  {'tok/s':>7}  {'ratio to k=0':>12}")
    for name, r in rows.items():
        print(f"{name:>10}  {r['tok_s']:>7.1f}  {r['ratio']:>11.3f}x")
    print(
        f"per step, batch 8 x vocab {llm.engine.vocab_size}: reference sort + tolist {costs['reference_ms']:.1f} ms, "
        f"truffula top-20 + rank + entropy {costs['truffula_ms']:.2f} ms ({costs['speedup']:.0f}x)"
    )
    write_result(
        "alternatives",
        {"command": "python benchmarks/alternatives.py", "rows": rows, "step_cost": costs},
    )


if __name__ == "__main__":
    main()
