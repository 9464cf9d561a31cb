"""Whether the Triton kernels can run here, and what is decided about them without Triton (tile
sizes, dependent launches). Importing this module never needs Triton or CUDA.

The ``*_triton.py`` modules import Triton at the top; ``truffula.kernels.select`` imports them
only when it picks the Triton kernels (a CUDA device with Triton installed and enabled).
"""

from __future__ import annotations

import os

import torch

from truffula.envs import TRUFFULA_KERNELS, TRUFFULA_PDL

try:
    import triton  # noqa: F401

    AVAILABLE = True
    """Triton is installed (and imports)."""
except ImportError:  # CPU-only installs
    AVAILABLE = False

HAS_DESCRIPTORS = False
"""This Triton makes tensor descriptors (TMA loads on Hopper): 3.4 and later."""
HAS_PDL = False
"""This Triton launches kernels as programmatic dependent launches (``launch_pdl``, ``gdc_*``)."""
if AVAILABLE:
    import triton.language as _tl

    HAS_DESCRIPTORS = hasattr(_tl, "make_tensor_descriptor")
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_PDL = True
    except ImportError:  # older Triton: the kernels' ``if PDL:`` branches are never compiled
        gdc_wait = gdc_launch_dependents = None

ENABLED = AVAILABLE and os.environ.get(TRUFFULA_KERNELS, "auto") != "torch"
"""``TRUFFULA_KERNELS=torch`` keeps the torch reference on CUDA too (for comparisons)."""

_PDL: dict[int, bool] = {}

PDL_ROWS = 1
"""Rows up to which a launch is dependent: on an H200 (8B shape) batch-1 decode took 4.18
against 4.33 ms/token with it, and a decode step of 64 rows 5.96 against 5.86 ms."""


def fit_tiles(bm: int, bn: int, stages: int, d: int, elem: int, limit: int) -> tuple[int, int, int]:
    """The prefill-chunk kernel's tiles (``attention_prefill_triton``) shrunk until a program
    fits: query blocks so that the fp32 accumulator holds at most 128 x 128 values, then
    stages (to 2), key blocks and query blocks (to 32) until the query tile and ``stages`` key
    and value tiles fit ``limit`` bytes of shared memory. Head dimensions of 256 (Gemma) need
    half the 128's tiles."""

    def smem(bm: int, bn: int, stages: int) -> int:
        return (bm + 2 * stages * bn) * d * elem

    bm = min(bm, max(32, 128 * 128 // d))  # the fp32 accumulator, bm x d, in registers
    while smem(bm, bn, stages) > limit:
        if stages > 2:
            stages -= 1
        elif bn > 32:
            bn //= 2
        elif bm > 32:
            bm //= 2
        else:
            break
    return bm, bn, stages


def pdl(device: torch.device, rows: int) -> bool:
    """Whether a decode kernel over ``rows`` rows launches with programmatic dependent launch on
    ``device`` (Hopper and later, not through Triton's interpreter; ``TRUFFULA_PDL=0`` turns
    it off): such a kernel is launched while the one before it finishes, and waits for it
    (``gdc_wait``) before touching memory, so the launch gaps between a one-token step's many
    small kernels overlap the kernels before them, in CUDA graphs too."""
    if not HAS_PDL or device.type != "cuda" or rows > PDL_ROWS:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL:
        _PDL[index] = (
            os.environ.get(TRUFFULA_PDL, "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(index)[0] >= 9
        )
    return _PDL[index]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


VARLEN_ROWS = 64
"""Query rows (tokens x query heads of one kv head) per program of the varlen attention."""


def varlen_block_q(num_heads: int, num_kv_heads: int) -> int:
    """Query tokens per tile of ``attention_varlen_triton`` for this head layout (at least 1)."""
    return max(1, VARLEN_ROWS // next_pow2(num_heads // num_kv_heads))


def pdl_launch(dependent: bool) -> dict[str, bool]:
    """The launch option of a dependent launch (none otherwise, which any Triton accepts)."""
    return {"launch_pdl": True} if dependent else {}
