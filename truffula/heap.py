"""The garbage collector in truffula's long-running processes (engine and API).

A full collection walks every container object alive. After start-up those are mostly the
model's modules, the tokenizer's tables and the web app's routes and schemas, none of which
ever become garbage; collecting them again and again pauses the step loop, or every stream an
API process serves, for tens of milliseconds under load (alternatives for every token create
many short-lived objects, so collections come often). ``settle`` collects once and freezes
what survived, so later collections walk only what requests create, and raises the first
generation's threshold: nearly everything a step or a response allocates is freed by reference
counting, and fewer young collections promote fewer of those objects to be walked again later.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import time

from truffula.envs import TRUFFULA_GC_LOG

log = logging.getLogger("truffula.heap")


YOUNG_THRESHOLD = 50_000
"""Allocations (net of frees) of container objects between young collections (CPython: 700 or
2,000)."""


def settle() -> None:
    """Call once start-up is done: collect, freeze the survivors (``gc.freeze``), and collect the
    young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    if os.environ.get(TRUFFULA_GC_LOG):
        watch(float(os.environ[TRUFFULA_GC_LOG]) / 1e3)


def watch(threshold_s: float) -> None:
    """Log every collection that takes longer than ``threshold_s`` (``TRUFFULA_GC_LOG=<ms>``)."""
    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
            return
        took = time.perf_counter() - started.pop("t", time.perf_counter())
        if took >= threshold_s:
            log.warning(
                "garbage collection of generation %d took %.1f ms in %s (%d collected)",
                info.get("generation", -1),
                took * 1e3,
                multiprocessing.current_process().name,
                info.get("collected", 0),
            )

    gc.callbacks.append(callback)
