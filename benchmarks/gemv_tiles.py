"""The one-row GEMVs' tile tables on CUDA, the previous table against the chosen one in one
process: batch-1 decode of the Llama-3-8B shape (random weights) in bf16, with
``--quantization fp8`` and with ``--quantization int4``.

    python benchmarks/gemv_tiles.py [--repeats 3] [--out DIR]

Tiles are compiled into the captured decode graphs, so each table gets an engine of its own,
built with it; the engines alternate, each measured ``--repeats`` times (median ms/token).
Different tiles sum in a different order, so the greedy tokens are reported, not required, equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from gemv_prefetch import alternate
from gpu import build_8b, measure_bandwidth, weight_bytes

from truffula.kernels import linear_triton, quant_int4_triton

Config = tuple[int, int, int, int]


def previous_16bit(n_out: int, elem: int = 2) -> Config:
    """The table before: one for 16-bit and fp8 weights alike."""
    if n_out >= 16384:
        return 16, 256, 4, 3
    return (8, 512, 8, 4) if n_out > 4096 else (4, 1024, 4, 4)


def previous_int4(n_out: int, n_groups: int) -> Config:
    """The table before: up to 8 groups a step for every projection but the widest."""
    tiles = (4, 2, 1) if n_out >= 16384 else (8, 4, 2, 1)
    return 8, next(t for t in tiles if n_groups % t == 0), 4, 3


CHOSEN_16BIT, CHOSEN_INT4 = linear_triton._config, quant_int4_triton.gemv_config


def use(quant: str | None, previous: bool) -> None:
    """Point the kernels at the previous or the chosen table."""
    linear_triton._config = previous_16bit if previous and quant != "int4" else CHOSEN_16BIT
    quant_int4_triton.gemv_config = previous_int4 if previous and quant == "int4" else CHOSEN_INT4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    hf, folder = build_8b()
    roof = 1e3 * weight_bytes(hf) / measure_bandwidth()
    res: dict[str, Any] = {"bf16_roofline_ms": roof}
    for quant in (None, "fp8", "int4"):
        label = quant or "bf16"
        ms, same = alternate(
            folder, hf, quant, lambda chosen, q=quant: use(q, not chosen), args.repeats
        )
        before, after = statistics.median(ms[False]), statistics.median(ms[True])
        res[label] = {"previous_ms": ms[False], "chosen_ms": ms[True], "same_tokens": same}
        print(
            f"{label}: previous tiles {before:.3f} ms/token, chosen {after:.3f} "
            f"({before / after:.3f}x; bf16 roofline {roof:.2f} ms); same tokens: {same}",
            flush=True,
        )
    use(None, False)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemv-tiles.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
