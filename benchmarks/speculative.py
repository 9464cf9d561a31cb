"""Speculative decoding (prompt lookup or a draft model) against plain decoding, single
stream, same run.

    python benchmarks/speculative.py [--repeats 3] [--new 96] [--k 4]
    python benchmarks/speculative.py --method draft_model [--draft-model PATH_OR_HUB_ID]

The default model on CPU, one engine started with ``--speculative-config {"method": "ngram",
"num_speculative_tokens": K, "prompt_lookup_max": 3}``; plain decoding is the same engine with
``speculative: false`` per request, so weights, threads and memory are shared and the runs
interleave (prompt by prompt, plain then speculative). Greedy chat prompts of two kinds:
copy-heavy (repeat or lightly edit a given text, continue code that repeats itself) and free
text (questions). Each run checks that both give the same tokens. Reports tokens/s of each
kind (generated tokens over wall time, medians of ``--repeats``), their ratio, and the drafted
and accepted token counts.

``--method draft_model`` starts the engine with ``{"method": "draft_model", "model":
DRAFT, "num_speculative_tokens": K}`` instead (``--draft-model``, default ``default``: the
default model drafting for itself, since no smaller model with its tokenizer is at hand). A
draft that is the target accepts nearly everything and costs as much per drafted token as the
target per step, so that run measures the mechanism (acceptance, the draft model's catch-up,
rollback and verification overhead), not a speed-up. Results go to ``speculative.json``
(ngram) or ``speculative-draft-model.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import machine, write_result

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long "
    "discussion, the members agreed to fund the children's reading room, the new roof and "
    "longer opening hours on weekends, and asked the architect for a revised plan by March."
)
CODE = (
    "def area_of_square(side):\n    return side * side\n\n\n"
    "def area_of_rectangle(width, height):\n    return width * height\n\n\n"
    "def area_of_triangle(base, height):\n"
)
COPY = [
    f"Repeat this text exactly, word for word:\n\n{TEXT}",
    f"Rewrite this text, replacing 'committee' with 'council' and changing nothing else:\n\n{TEXT}",
    f"Continue this Python code with two more similar functions:\n\n{CODE}",
]
FREE = [
    "Why is the sky blue? Answer in a short paragraph.",
    "Give three tips for writing clear emails.",
    "Describe a cat to someone who has never seen one.",
]


def run(llm: LLM, prompt: str, new: int, speculative: bool) -> tuple[float, list[int]]:
    p = SamplingParams(max_new_tokens=new, temperature=0, speculative=speculative)
    t = time.perf_counter()
    out = llm.generate([prompt], p)[0]
    return len(out.token_ids) / (time.perf_counter() - t), out.token_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--method", choices=("ngram", "draft_model"), default="ngram")
    ap.add_argument("--draft-model", default="default", help="folder or hub id (draft_model)")
    args = ap.parse_args()
    spec: dict[str, object] = {"method": args.method, "num_speculative_tokens": args.k}
    if args.method == "ngram":
        spec["prompt_lookup_max"] = 3
    else:
        spec["model"] = args.draft_model
    llm = LLM(progress=False, speculative=json.dumps(spec))
    tok = llm.engine.tokenizer.hf

    def chat(q: str) -> str:
        msgs = [{"role": "user", "content": q}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    run(llm, chat(FREE[0]), 8, True)  # warm-up
    rows = {}
    for kind, asks in (("copy-heavy", COPY), ("free text", FREE)):
        plain_runs: list[float] = []
        spec_runs: list[float] = []
        drafter = llm.engine.drafter
        d0, a0 = drafter.drafted, drafter.accepted
        for _ in range(args.repeats):
            plain_t = spec_t = 0.0
            plain_n = spec_n = 0
            for q in asks:
                rate, plain_ids = run(llm, chat(q), args.new, False)
                plain_t += len(plain_ids) / rate
                plain_n += len(plain_ids)
                rate, spec_ids = run(llm, chat(q), args.new, True)
                assert spec_ids == plain_ids, "speculation changed the output"
                spec_t += len(spec_ids) / rate
                spec_n += len(spec_ids)
            plain_runs.append(plain_n / plain_t)
            spec_runs.append(spec_n / spec_t)
        plain, fast = statistics.median(plain_runs), statistics.median(spec_runs)
        rows[kind] = {
            "plain_tok_s": plain,
            "speculative_tok_s": fast,
            "ratio": fast / plain,
            "plain_runs": plain_runs,
            "speculative_runs": spec_runs,
            "drafted": drafter.drafted - d0,
            "accepted": drafter.accepted - a0,
        }
    print(f"machine: {machine()}")
    print(
        f"{'prompts':>10}  {'plain tok/s':>11}  {'spec tok/s':>10}  {'ratio':>6}  {'accepted':>13}"
    )
    for kind, r in rows.items():
        print(
            f"{kind:>10}  {r['plain_tok_s']:>11.1f}  {r['speculative_tok_s']:>10.1f}  "
            f"{r['ratio']:>5.2f}x  {r['accepted']:>5}/{r['drafted']:<7}"
        )
    command = (
        f"python benchmarks/speculative.py --repeats {args.repeats} --new {args.new} --k {args.k}"
    )
    name = "speculative"
    if args.method == "draft_model":
        command += f" --method draft_model --draft-model {args.draft_model}"
        name = "speculative-draft-model"
    write_result(name, {"command": command, "speculative_config": spec, "rows": rows})


if __name__ == "__main__":
    main()
