"""Host-to-device copies that never wait for the device.

A copy from pageable host memory to a GPU first waits for the work already queued on the
stream. With asynchronous scheduling the stream holds the previous step while the next one is
prepared, so every input goes through pinned memory instead (PyTorch's caching host allocator
keeps the buffer alive until its copy has run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_tensor(values: Sequence[object], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, copied without a wait."""
    return to_device(torch.tensor(values, dtype=dtype), device)
