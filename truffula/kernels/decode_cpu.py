"""A CPU step through every layer in one native call (``csrc/decode_cpu.cpp``).

A step of few tokens on a CPU spends most of its time between the projections: some 20 small
ops a layer (residual adds, norms, rotary, conversions, the cache write), each a few µs of
dispatch.
``decode_layers`` runs the projections and the attention through the same ATen ops as the eager
model and the rest as loops over each token's vectors, rounding where the eager ops round. The
model side (which models fit, their tensors) is ``truffula.models.decode_cpu``.

The extension is compiled on first use with the machine's C++ compiler (``torch.utils.
cpp_extension``, ninja from the ``ninja`` package) into truffula's cache folder, keyed by the
source and torch's version; where that fails the eager model runs, and the log says why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from truffula.envs import TRUFFULA_FUSED_CPU_DECODE, cache_dir

log = logging.getLogger("truffula.kernels")

SOURCE = Path(__file__).with_name("csrc") / "decode_cpu.cpp"
LIBRARY = "truffula_decode_cpu.so"

INT4, PACKED, DENSE, INT8 = 0, 1, 2, 3
"""Linear kinds ``decode_layers`` takes: torch's CPU int4 layout, oneDNN-packed, F.linear,
``_weight_int8pack_mm``."""


def build_dir() -> Path:
    """The extension's folder in the cache: one per source text and torch version."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    return cache_dir() / "extensions" / f"decode_cpu-{key}"


@functools.cache
def available() -> bool:
    """Loads ``torch.ops.truffula_cpu.decode_layers`` from the cache, building it first where it
    is not there yet; False, with the reason logged, where it cannot be built."""
    if os.environ.get(TRUFFULA_FUSED_CPU_DECODE, "1") == "0":
        return False
    folder = build_dir()
    try:
        if (folder / LIBRARY).exists():
            torch.ops.load_library(str(folder / LIBRARY))
        else:
            _build(folder)
    except Exception as exc:  # no compiler, no ninja, a torch without headers
        log.warning(
            "the fused CPU decode is not available (%s: %s); eager decode",
            type(exc).__name__,
            str(exc)[:300],
        )
        return False
    return hasattr(torch.ops.truffula_cpu, "decode_layers")


def _build(folder: Path) -> None:
    """Compile and load the extension in a folder of this process's own, then move it into
    place: processes starting together (an engine and its tests, replicas) each build their
    own and the first to finish publishes it; none waits on a lock another one, killed
    mid-build, left behind."""
    try:
        import ninja  # the build tool cpp_extension runs; on PATH for it

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils import cpp_extension

    log.info("building the fused CPU decode (once; about 15 s on 2 cores)")
    own = folder.with_name(f"{folder.name}.{os.getpid()}")
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir(parents=True)
    cpp_extension.load(
        name=LIBRARY.removesuffix(".so"),
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-ffp-contract=off"],
        build_directory=str(own),
        is_python_module=False,
        verbose=False,
    )
    try:
        own.rename(folder)
    except OSError:  # another process published it first: keep its copy, drop this one
        shutil.rmtree(own, ignore_errors=True)
