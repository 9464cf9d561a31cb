"""Multi-LoRA throughput on CPU with the default model.

    python benchmarks/multi_lora.py [--repeats 3]

32 concurrent requests (64 in, 64 out, ignore_eos, greedy) spread over 1, 4, 16 and 32 distinct
rank-8 adapters on all projections (q, k, v, o, gate, up, down; random weights), against the
base model alone, as ratios measured in the same run (configurations interleaved, medians).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import machine, random_adapters, random_prompts, write_result

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams

RANK = 8


def run(llm: LLM, prompts: list[list[int]], adapters: list[str | None]) -> float:
    params = [
        SamplingParams(
            max_new_tokens=64,
            temperature=0,
            ignore_eos=True,
            adapter_id=adapters[i % len(adapters)],
        )
        for i in range(len(prompts))
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(progress=False, max_num_seqs=32, max_active_adapters=32, max_lora_rank=RANK)
    keys = random_adapters(llm.engine.adapters, 32, RANK, 0.02)
    prompts = random_prompts(32, 64)
    configs: dict[str, list[str | None]] = {"base": [None]}
    for n in (1, 4, 16, 32):
        configs[f"{n} adapters"] = list(keys[:n])
    run(llm, prompts[:4], keys[:4])  # warm-up: adapters into their slots
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, adapters in configs.items():
            samples[name].append(run(llm, prompts, adapters))
    base = statistics.median(samples["base"])
    rows = {
        name: {"tok_s": statistics.median(v), "ratio": statistics.median(v) / base, "runs": v}
        for name, v in samples.items()
    }
    print(f"machine: {machine()}")
    print(f"{'config':>12}  {'tok/s':>7}  {'ratio to base':>13}")
    for name, r in rows.items():
        print(f"{name:>12}  {r['tok_s']:>7.1f}  {r['ratio']:>12.3f}x")
    write_result("multi_lora", {"command": "python benchmarks/multi_lora.py", "rows": rows})


if __name__ == "__main__":
    main()
