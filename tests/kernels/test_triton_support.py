"""What ``kernels.triton_support`` decides without Triton or a GPU: the prefill kernel's tiles for
a device's shared memory, and which launches are dependent."""

from __future__ import annotations

import torch

from truffula.kernels import triton_support
from truffula.kernels.triton_support import fit_tiles, pdl, pdl_launch

H200 = 232_448
"""Shared memory a program may claim on an H100/H200 (bytes)."""


def smem(bm: int, bn: int, stages: int, d: int, elem: int) -> int:
    return (bm + 2 * stages * bn) * d * elem


def test_the_measured_tiles_stand_where_they_fit() -> None:
    assert fit_tiles(128, 128, 3, 128, 2, H200) == (128, 128, 3)
    assert fit_tiles(128, 64, 3, 64, 2, H200) == (128, 64, 3)


def test_tiles_shrink_to_the_device() -> None:
    """Head dimension 256 (Gemma), a GPU with less shared memory, fp32: every answer fits the
    limit and keeps the accumulator within 128 x 128 values."""
    for d, elem, limit in ((256, 2, H200), (256, 2, 166_912), (128, 2, 101_376), (128, 4, H200)):
        bm, bn, stages = fit_tiles(128, 128, 3, d, elem, limit)
        assert smem(bm, bn, stages, d, elem) <= limit, (d, elem, limit, bm, bn, stages)
        assert bm * d <= 128 * 128 and stages >= 2 and min(bm, bn) >= 32
    assert fit_tiles(128, 128, 3, 256, 2, H200)[0] == 64  # the accumulator, not the memory


def test_launches_are_dependent_only_on_cuda_for_one_row() -> None:
    assert not pdl(torch.device("cpu"), 1)
    assert pdl_launch(False) == {}
    assert pdl_launch(True) == {"launch_pdl": True}
    if torch.cuda.is_available() and triton_support.HAS_PDL:
        assert not pdl(torch.device("cuda"), triton_support.PDL_ROWS + 1)
