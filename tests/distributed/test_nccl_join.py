"""The model's NCCL communicator waits for every rank through the group's store, with the
group's timeout, before ``ncclCommInitRank`` (which would wait for a dead rank forever): a rank
that never joins is an error, not a hang. Runs without CUDA: the wait comes first."""

from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from truffula.distributed.nccl import NcclComm


def test_a_missing_rank_times_out() -> None:
    timeout = datetime.timedelta(seconds=10)
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="joined/1"):
        NcclComm(0, 2, None, store, 0.5)  # type: ignore[arg-type]
    assert time.monotonic() - start < 5
