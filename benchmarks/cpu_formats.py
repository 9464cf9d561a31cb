"""Quality of the CPU weight formats against fp32 on the default model, through the engine.

    python benchmarks/cpu_formats.py [--tokens 512]

Teacher-forced over the README's first ``--tokens`` tokens (prompt logprobs with the top
alternative, ``decoder_input_details``): top-1 agreement with the fp32 engine and mean
|Δ logprob| of the text's own next tokens, for ``--dtype bfloat16``, ``--quantization int8``
and both. Each engine computes its logprobs in fp32 from its own logits.
"""

from __future__ import annotations

import argparse
from typing import Any

from common import ROOT, machine, write_result
from throughput import SETTINGS

from truffula.engine.llm import LLM
from truffula.sampling.params import SamplingParams

FORMATS: dict[str, dict[str, Any]] = {**SETTINGS, "bf16": {"dtype": "bfloat16"}}


def teacher_forced(llm: LLM, ids: list[int]) -> tuple[list[int], list[float]]:
    """(most likely token, logprob of the text's token) at each position after the first."""
    params = SamplingParams(
        max_new_tokens=1, temperature=0, decoder_input_details=True, prompt_k_alternatives=1
    )
    out = llm.generate([ids], params)[0]
    infos = (out.prompt_tokens or [])[1:]
    assert len(infos) == len(ids) - 1
    top = [t.alternatives[0].id if t.alternatives else -1 for t in infos]
    return top, [float(t.logprob if t.logprob is not None else float("nan")) for t in infos]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    ref: tuple[list[int], list[float]] | None = None
    ids: list[int] = []
    for label, opts in FORMATS.items():
        llm = LLM(progress=False, enable_prefix_caching=False, **opts)
        if not ids:
            ids = llm.tokenizer.encode((ROOT / "README.md").read_text())[: args.tokens]
        top, lps = teacher_forced(llm, ids)
        if ref is None:
            ref = (top, lps)
            continue
        n = len(lps)
        results[label] = {
            "tokens": len(ids),
            "top1_agreement": sum(a == b for a, b in zip(top, ref[0], strict=True)) / n,
            "mean_abs_dlogprob": sum(abs(a - b) for a, b in zip(lps, ref[1], strict=True)) / n,
            "finite": all(abs(x) < float("inf") for x in lps),
        }
        print(f"{label}: {results[label]}", flush=True)
    write_result(
        "cpu-formats",
        {"command": "python benchmarks/cpu_formats.py", "machine": machine(), "formats": results},
    )


if __name__ == "__main__":
    main()
