"""Linear layers on x86 CPUs with weights pre-packed once for oneDNN.

``torch.nn.functional.linear`` re-reads a [out, in] fp32 weight in a layout that is slow for
the skinny activations of decoding; oneDNN's reordered weight streams at close to memory
bandwidth. Semantics are exactly ``F.linear(x, weight, bias)`` (same fp32 arithmetic, another
summation order). The reference is ``F.linear`` itself.

Which of the two is faster depends on the CPU (on some, F.linear is 1.7-2.3x faster for decode
shapes; on others the packed weight is): ``choose`` times both on the model's own shapes when
the engine starts and keeps the answer per CPU model in the cache folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F


def pack(weight: torch.Tensor) -> torch.Tensor:
    """Reorder a [out, in] weight into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] with a weight from ``pack``."""
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), packed, bias).reshape(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """True when oneDNN packing works here and matches F.linear on a small check."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=gen).to(dtype)
        b = torch.randn(48, generator=gen).to(dtype)
        x = torch.randn(3, 32, generator=gen).to(dtype)
        got = linear(x, pack(w), b).float()
        want = F.linear(x.float(), w.float(), b.float())
    except (RuntimeError, AttributeError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got, want, atol=tol, rtol=tol))


# ---------------------------------------------------------------- choice by measurement
CANDIDATES = ("torch", "packed")
BATCHES = (1, 8)
"""Rows timed per shape: a single stream's decode step and a small batch's."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fastest_us(fns: dict[str, Callable[[], object]], budget_s: float = 0.006) -> dict[str, float]:
    """The fastest call of each of ``fns`` in microseconds, calls interleaved (so every
    candidate sees the same load) over about ``budget_s``, after two warm-up calls each: other
    work on the machine only ever adds time, so the minimum is the op's own."""
    for fn in fns.values():
        fn()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    end, rounds = time.perf_counter() + budget_s, 0
    while rounds < 5 or (time.perf_counter() < end and rounds < 200):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        rounds += 1
    return {name: 1e6 * t for name, t in best.items()}


def measure(shape: tuple[int, int], dtype: torch.dtype) -> dict[str, float]:
    """Microseconds of each candidate on a random [out, in] weight, summed over ``BATCHES``."""
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)
    packed = pack(w)
    res = dict.fromkeys(CANDIDATES, 0.0)
    for rows in BATCHES:
        x = torch.randn(rows, in_f, generator=gen).to(dtype)
        fns: dict[str, Callable[[], object]] = {
            "torch": functools.partial(F.linear, x, w),
            "packed": functools.partial(linear, x, packed, None),
        }
        for name, us in fastest_us(fns).items():
            res[name] += us
    return res


ROUNDS = 3
"""Independent measurements of a shape; a choice is kept only when they all agree."""

MIN_BYTES_PER_S = 1e9
"""A measurement whose faster candidate read its weight slower than this was taken on a busy
CPU (threads waiting for cores): it decides nothing and is not kept."""

_decided: dict[str, str] = {}
"""This process's choices by cache key: every engine of a process computes alike."""


def choose(
    shapes: Iterable[tuple[int, int]], dtype: torch.dtype, cache: Path | None = None
) -> dict[tuple[int, int], str]:
    """The faster candidate for each [out, in] weight shape on this CPU: measured once (tens of
    milliseconds a shape) and kept in ``cache`` (JSON) per CPU model, thread count, torch
    version, dtype and shape. A shape whose ``ROUNDS`` measurements disagree or read the weight
    implausibly slowly (a busy machine) gets ``packed`` and is measured again by the next
    process."""
    stored: dict[str, dict[str, float]] = {}
    if cache is not None and cache.exists():
        with contextlib.suppress(OSError, ValueError):
            stored = json.loads(cache.read_text())
    prefix = f"{cpu_model()}|{torch.get_num_threads()} threads|torch {torch.__version__}|{dtype}"
    chosen, fresh = {}, False
    with torch.inference_mode():
        for shape in sorted(set(shapes)):
            key = f"{prefix}|{shape[0]}x{shape[1]}"
            if key in _decided:
                chosen[shape] = _decided[key]
                continue
            if key not in stored:
                runs = [measure(shape, dtype) for _ in range(ROUNDS)]
                weight = shape[0] * shape[1] * torch.finfo(dtype).bits // 8 * len(BATCHES)
                slow = any(weight / (1e-6 * min(r.values())) < MIN_BYTES_PER_S for r in runs)
                if slow or len({min(r, key=r.__getitem__) for r in runs}) > 1:
                    chosen[shape] = _decided[key] = "packed"  # undecided: the default
                    continue
                stored[key] = {c: min(r[c] for r in runs) for c in CANDIDATES}
                fresh = True
            times = stored[key]
            best = min(CANDIDATES, key=lambda c: times.get(c, float("inf")))
            chosen[shape] = _decided[key] = best
    if fresh and cache is not None:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
            tmp.replace(cache)
    return chosen
