"""Weight formats on CPU: the default model in fp32 against ``--quantization int8``, same run.

Single stream (one request at a time), greedy, fixed length (ignore_eos), with and without
logprobs (``details`` + 5 alternatives per token). The two engines run interleaved, repeat after
repeat, and the medians are reported (the machine is shared and noisy). Quality: teacher-forced
top-1 agreement with fp32 and mean |delta logprob| of the text's next tokens over a fixed text
(the README's opening), through the runner's paged-cache forward.

    .venv/bin/python benchmarks/models.py [--repeats 7] [--new-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from common import ROOT, machine, write_result

sys.path.insert(0, str(ROOT / "tests"))


def tok_s(llm: Any, prompt: str, new_tokens: int, logprobs: bool) -> float:
    from truffula.sampling.params import SamplingParams

    params = SamplingParams(
        max_new_tokens=new_tokens,
        temperature=0,
        ignore_eos=True,
        details=logprobs,
        return_k_alternatives=5 if logprobs else 0,
    )
    start = time.perf_counter()
    out = llm.generate([prompt], params)
    elapsed = time.perf_counter() - start
    assert len(out[0].token_ids) == new_tokens
    return new_tokens / elapsed


@torch.inference_mode()
def quality(folder: Any, text: str) -> dict[str, float]:
    from modelharness import Harness
    from transformers import AutoTokenizer

    from truffula.layers.linear import quantize_linears

    ids = AutoTokenizer.from_pretrained(folder)(text).input_ids[:512]
    ref = Harness(folder, block_size=16, num_blocks=40, pack=True).step({"a": ids})["a"]
    h = Harness(folder, block_size=16, num_blocks=40)
    quantize_linears(h.runner.model, "int8", h.runner.kernels)
    got = h.step({"a": ids})["a"]
    nxt = torch.tensor(ids[1:])[:, None]
    return {
        "tokens": len(ids),
        "top1_agreement": (got[:-1].argmax(-1) == ref[:-1].argmax(-1)).float().mean().item(),
        "mean_abs_dlogprob": (got[:-1].gather(1, nxt) - ref[:-1].gather(1, nxt))
        .abs()
        .mean()
        .item(),
        "finite": bool(torch.isfinite(got).all()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="models", help="benchmarks/results/<out>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from truffula.engine.llm import LLM
    from truffula.model_store.default_model import ensure_default_model

    folder = ensure_default_model(progress=False)
    text = (ROOT / "README.md").read_text()
    q = quality(folder, text)
    print(f"quality: {q}", flush=True)
    engines = {
        "fp32": LLM("default", progress=False, max_k_alternatives=5),
        "int8": LLM("default", progress=False, max_k_alternatives=5, quantization="int8"),
    }
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    runs: dict[str, list[float]] = {f"{e}{s}": [] for e in engines for s in ("", "+logprobs")}
    for llm in engines.values():  # warm-up
        tok_s(llm, prompt, 8, False)
    for r in range(args.repeats):
        for logprobs in (False, True):
            for name, llm in engines.items():
                key = name + ("+logprobs" if logprobs else "")
                runs[key].append(tok_s(llm, prompt, args.new_tokens, logprobs))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "command": "benchmarks/models.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "tok_s_median": med,
        "tok_s_runs": runs,
        "int8_speedup": med["int8"] / med["fp32"],
        "int8_speedup_logprobs": med["int8+logprobs"] / med["fp32+logprobs"],
        "quality": q,
    }
    print(
        f"{machine()}\nsingle stream tok/s (median of {args.repeats}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
        + f"\nint8 / fp32: {result['int8_speedup']:.2f}x "
        f"(with logprobs {result['int8_speedup_logprobs']:.2f}x)"
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
