"""A NCCL communicator called directly (ctypes on the ``libnccl`` torch loaded), for the sum
all-reduces inside the model's forward pass.

The model's all-reduces run on the current stream with no ``torch.distributed`` work object:
they can be captured in CUDA graphs (torch's process group waits for its watchdog's pending
work before each capture and tracks every collective, neither of which a replayed graph
needs), and an eager one costs a library call instead of a work object. The group's other
collectives (statistics, gathers, broadcasts) stay on the torch process group.
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import os
from typing import Any

import torch

_TYPES = {
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
SUM, MAX, MIN = 0, 2, 3
_UID_KEY = "truffula/nccl-unique-id"


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def _library() -> ctypes.CDLL:
    """The NCCL torch already loaded (the same soname), else the pip package's copy."""
    try:
        return ctypes.CDLL("libnccl.so.2")
    except OSError:
        import nvidia

        for root in nvidia.__path__:
            for path in glob.glob(os.path.join(root, "nccl", "lib", "libnccl.so*")):
                return ctypes.CDLL(path)
        raise


class NcclComm:
    """Rank ``rank`` of ``world``; rank 0 makes the unique id and shares it through ``store``
    (torch's TCP store of the group), once every rank has joined within ``timeout`` seconds."""

    def __init__(
        self, rank: int, world: int, device: torch.device, store: Any, timeout: float
    ) -> None:
        # every rank reaches this point before any calls ncclCommInitRank, which waits for the
        # others with no timeout: a rank that died on its way fails the store's wait instead
        store.set(f"{_UID_KEY}/joined/{rank}", b"1")
        joined = [f"{_UID_KEY}/joined/{r}" for r in range(world)]
        store.wait(joined, datetime.timedelta(seconds=timeout))
        lib = self.lib = _library()
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclCommInitRank.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            _UniqueId,
            ctypes.c_int,
        ]
        lib.ncclAllReduce.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        uid = _UniqueId()
        if rank == 0:
            self._check(lib.ncclGetUniqueId(ctypes.byref(uid)))
            store.set(_UID_KEY, bytes(uid.internal))
        else:
            raw = store.get(_UID_KEY)
            ctypes.memmove(ctypes.addressof(uid), raw, len(raw))
        self.comm = ctypes.c_void_p()
        with torch.cuda.device(device):
            self._check(lib.ncclCommInitRank(ctypes.byref(self.comm), world, uid, rank))
        self.device = device

    def all_reduce(self, x: torch.Tensor, op: int = SUM) -> torch.Tensor:
        """``op`` of ``x`` over the ranks, in place, on the current stream; returns ``x``."""
        if not x.is_contiguous():
            raise ValueError("NCCL all-reduce needs a contiguous tensor")
        stream = torch.cuda.current_stream(self.device).cuda_stream
        ptr = x.data_ptr()
        self._check(
            self.lib.ncclAllReduce(ptr, ptr, x.numel(), _TYPES[x.dtype], op, self.comm, stream)
        )
        return x

    def abort(self) -> None:
        """End the communicator now (a peer died): kernels waiting on it return. It can block
        while peers live, so only a rank's death calls it, from a thread of its own."""
        comm, self.comm = self.comm, ctypes.c_void_p()
        if comm.value:
            self.lib.ncclCommAbort(comm)

    def _check(self, result: int) -> None:
        if result != 0:
            text = self.lib.ncclGetErrorString(result).decode()
            raise RuntimeError(f"NCCL error {result}: {text}")
