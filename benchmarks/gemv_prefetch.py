"""A switch of the one-row GEMV on CUDA, on and off in one process: batch-1 decode of the
Llama-3-8B shape (random weights) in bf16 and with ``--quantization fp8``.

    python benchmarks/gemv_prefetch.py [--switch prefetch|gated] [--repeats 3] [--out DIR]

``prefetch``: a dependent launch (Hopper) of the GEMV loads its first weight tile before it
waits for the kernel before it (``kernels.linear_triton.PREFETCH``). ``gated``: the gate/up
projection applies SiLU * up in its epilogue instead of a kernel after it
(``kernels.linear_triton.GATED_ROWS``). One engine per setting, built with it (the setting is
compiled into the captured graphs); engines alternate, each measured ``--repeats`` times; the
greedy tokens are compared (the prefetch changes no arithmetic; the gated epilogue skips the
16-bit rounding of gate and up, so its tokens may differ).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu import batch1_ms_per_token, build_8b, engine_for, measure_bandwidth, weight_bytes

from truffula.kernels import linear_triton
from truffula.sampling.params import SamplingParams


def tokens(core) -> list[int]:  # type: ignore[no-untyped-def]
    core.add_request(
        [3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    )
    got: list[int] = []
    while core.has_work():
        for o in core.step():
            got += [t.id for t in o.tokens]
    return got


def alternate(
    folder: Path, hf: Any, quant: str | None, setting: Callable[[bool], None], repeats: int
) -> tuple[dict[bool, list[float]], bool]:
    """Batch-1 ms/token of one engine per value of a switch (``setting(value)`` applied before
    the engine is built, so its graphs capture it, and before each measurement), the engines
    alternating ``repeats`` times; and whether their greedy tokens agree."""
    engines = {}
    for on in (False, True):
        setting(on)
        engines[on] = engine_for(
            folder,
            hf,
            enable_prefix_caching=False,
            max_num_seqs=8,
            kv_cache_memory=2 << 30,
            quantization=quant,
        )
    same = tokens(engines[False]) == tokens(engines[True])
    ms: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for on, core in engines.items():
            setting(on)
            ms[on].append(batch1_ms_per_token(core))
    engines.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return ms, same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", choices=("prefetch", "gated"), default="prefetch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    flag = {"prefetch": "PREFETCH", "gated": "GATED_ROWS"}[args.switch]
    hf, folder = build_8b()
    roof = 1e3 * weight_bytes(hf) / measure_bandwidth()
    res: dict[str, object] = {"bf16_roofline_ms": roof}
    for quant in (None, "fp8"):
        label = quant or "bf16"
        ms, same = alternate(
            folder, hf, quant, lambda on: setattr(linear_triton, flag, on), args.repeats
        )
        off, on = statistics.median(ms[False]), statistics.median(ms[True])
        res[label] = {"off_ms": ms[False], "on_ms": ms[True], "same_tokens": same}
        print(
            f"{label}: {args.switch} off {off:.3f} ms/token, on {on:.3f} ({off / on:.3f}x; "
            f"{100 * roof / on:.1f}% of the bf16 roofline {roof:.2f} ms); same tokens: {same}",
            flush=True,
        )
    setattr(linear_triton, flag, True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"gemv-{args.switch}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
