"""Whether the Triton kernels can run here. Importing this module never needs Triton or CUDA.

The ``*_triton.py`` modules import Triton at the top; ``truffula.kernels.select`` imports them
only when it picks the Triton kernels (a CUDA device with Triton installed and enabled).
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    AVAILABLE = True
    """Triton is installed (and imports)."""
except ImportError:  # CPU-only installs
    AVAILABLE = False

ENABLED = AVAILABLE and os.environ.get("TRUFFULA_KERNELS", "auto") != "torch"
"""``TRUFFULA_KERNELS=torch`` keeps the torch reference on CUDA too (for comparisons)."""


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())
