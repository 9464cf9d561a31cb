"""The tensor-parallel group of one engine: this process's rank, the world size, its device,
and the few collectives the sharded layers and the sampler use.

The group is a process group object of its own (gloo on CPU, NCCL on CUDA) over a TCP store on
the loopback interface, not torch.distributed's global default group: an engine's group lives
and dies with the engine, and a process may hold several engines. Every collective has the
group's timeout, so a rank that stops answering ends in an error, not a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from truffula.distributed.nccl import NcclComm
from truffula.envs import TRUFFULA_TP_TIMEOUT

TIMEOUT_ENV = TRUFFULA_TP_TIMEOUT
"""Seconds a collective (and the group's start-up) may wait for the other ranks."""
DEFAULT_TIMEOUT_S = 120.0


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


@dataclass(eq=False)
class TensorParallel:
    """Rank ``rank`` of ``world`` processes; rank 0 is the engine process."""

    rank: int
    world: int
    device: torch.device
    pg: Any = field(repr=False)
    """The process group (``ProcessGroupGloo`` / ``ProcessGroupNCCL``)."""
    store: Any = field(repr=False, default=None)
    nccl: NcclComm | None = field(repr=False, default=None)
    """CUDA: the communicator of the model's sum all-reduces (``truffula.distributed.nccl``:
    on the current stream, so CUDA graphs can hold them)."""

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def shard(self, size: int) -> tuple[int, int]:
        """(start, length) of this rank's equal part of ``size`` rows."""
        n = size // self.world
        return self.rank * n, n

    def all_reduce(self, x: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Sum (or ``op``) of ``x`` over the ranks, in place; returns ``x``."""
        if self.nccl is not None and op in (None, dist.ReduceOp.SUM):
            return self.nccl.all_reduce(x)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp(dist.ReduceOp.SUM if op is None else op)
        self.pg.allreduce([x], opts).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's ``x``, in rank order."""
        x = x.contiguous()
        out = x.new_empty((self.world, *x.shape))
        self.pg.allgather([list(out.unbind(0))], [x]).wait()
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of rank ``src`` on every rank, in place; returns ``x``."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([x], opts).wait()
        return x

    def min_int(self, value: int) -> int:
        """The least of one integer over the ranks."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(self.all_reduce(t, dist.ReduceOp.MIN).item())

    def close(self) -> None:
        """Drop the process group and its store (before the interpreter's teardown, which
        aborts the process when a gloo group outlives its store)."""
        # the NCCL communicator is left to the process's exit: ncclCommAbort and ncclCommDestroy
        # wait on the peers, which may be gone (the other ranks exit without tearing down)
        self.nccl = None
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            with contextlib.suppress(Exception):  # a peer already gone: nothing to shut down
                pg.shutdown()
        del pg
        self.store = None


def host_store(world: int) -> Any:
    """Rank 0's TCP store on a free loopback port (``.port``), not waiting for the others."""
    timeout = datetime.timedelta(seconds=timeout_s())
    return dist.TCPStore("127.0.0.1", 0, world, True, timeout=timeout, wait_for_workers=False)


def join_store(port: int, world: int) -> Any:
    timeout = datetime.timedelta(seconds=timeout_s())
    return dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)


def connect(rank: int, world: int, device: torch.device, store: Any) -> TensorParallel:
    """Build rank ``rank``'s process group over ``store`` (waits for every rank)."""
    timeout = datetime.timedelta(seconds=timeout_s())
    if device.type == "cuda":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise RuntimeError("--tensor-parallel-size on CUDA needs a torch built with NCCL")
        opts = nccl.Options()
        opts._timeout = timeout
        pg: Any = nccl(store, rank, world, opts)
        comm = NcclComm(rank, world, device, store, timeout.total_seconds())
        return TensorParallel(rank, world, device, pg, store, comm)
    pg = dist.ProcessGroupGloo(store, rank, world, timeout)
    return TensorParallel(rank, world, device, pg, store)


def device_for(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:rank`` on CUDA, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")
