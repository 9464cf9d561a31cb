"""CPU decode throughput on the default model, against HF transformers measured in the same run.

    python benchmarks/throughput.py [--repeats 3] [--new 64]

Single stream, 8 and 32 concurrent requests (64 prompt tokens, 64 generated, ignore_eos,
greedy). truffula's numbers count every generated token over the whole wall time (prefill
included), as HF ``generate``'s do. Ratios: single stream vs HF batch 1, 8 concurrent vs HF
batch 8, 32 concurrent vs HF batch 8. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import time

from common import hf_model, hf_tok_s, machine, median_of, random_prompts, write_result

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams


def ours_tok_s(llm: LLM, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(progress=False, max_num_seqs=64)
    hf = hf_model(llm.engine.model_folder)
    prompts = random_prompts(32, 64)
    ours_tok_s(llm, prompts[:2], 4)  # warm-up
    hf_tok_s(hf, prompts[:1], 4)
    rows = {}
    hf1, _ = median_of(lambda: hf_tok_s(hf, prompts[:1], args.new), args.repeats)
    hf8, _ = median_of(lambda: hf_tok_s(hf, prompts[:8], args.new), args.repeats)
    for n, peer, label in ((1, hf1, "HF batch 1"), (8, hf8, "HF batch 8"), (32, hf8, "HF batch 8")):
        ours, runs = median_of(lambda n=n: ours_tok_s(llm, prompts[:n], args.new), args.repeats)
        rows[n] = {
            "truffula_tok_s": ours,
            "runs": runs,
            "peer": label,
            "peer_tok_s": peer,
            "ratio": ours / peer,
        }
    print(f"machine: {machine()}")
    print(
        f"{'requests':>8}  {'truffula tok/s':>14}  {'peer':>11}  {'peer tok/s':>10}  {'ratio':>6}"
    )
    for n, r in rows.items():
        print(
            f"{n:>8}  {r['truffula_tok_s']:>14.1f}  {r['peer']:>11}  {r['peer_tok_s']:>10.1f}  {r['ratio']:>5.2f}x"
        )
    write_result("throughput", {"command": "python benchmarks/throughput.py", "rows": rows})


if __name__ == "__main__":
    main()
