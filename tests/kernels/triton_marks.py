"""What the Triton kernel tests share: they run on CUDA, or on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``, fp32 only), and are skipped otherwise (CI)."""

from __future__ import annotations

import os

import pytest
import torch

from truffula.kernels import triton_support

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not triton_support.AVAILABLE, reason="triton is not installed"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA (or TRITON_INTERPRET=1)"
    ),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]
