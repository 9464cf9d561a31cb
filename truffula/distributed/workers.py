"""Ranks 1..N-1 of a tensor-parallel engine: spawned processes that build the same model shard and
runner as rank 0 (the engine process) and run each step rank 0 sends them.

``start_workers`` spawns them (``torch.multiprocessing``, spawn), one duplex pipe each, and joins
the group; ``Workers`` is rank 0's side: it sends each step (``launch``, ``sample``: plain data,
pickled), the adapter slot writes made since the last step with it, and ``stop``. Workers
return nothing: rank 0's results are the engine's.

Faults: every collective has the group's timeout (``TRUFFULA_TP_TIMEOUT``, seconds); rank 0
checks that its workers live before each step and a watcher thread logs a worker's death at
once (and, on NCCL, aborts the group so a collective waiting for it fails now rather than at
the timeout). A worker exits when its pipe closes, when a step fails on it, and (Linux) when
its parent dies (``PR_SET_PDEATHSIG``): no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from truffula import envs
from truffula.config import EngineConfig
from truffula.distributed.parallel import (
    TIMEOUT_ENV,
    TensorParallel,
    connect,
    device_for,
    host_store,
    join_store,
    timeout_s,
)
from truffula.errors import TensorParallelError
from truffula.layers.lora import Factors, LoRALinear, apply_lora
from truffula.scheduler.output import SchedulerOutput

log = logging.getLogger("truffula.distributed")

SlotWrite = tuple[str, int, dict[str | None, tuple[Any, Any]] | None]
"""(LoRA layer name, slot, factors as numpy arrays or None: cleared)."""


class Workers:
    """Rank 0's side of the other ranks: their processes and pipes."""

    def __init__(self, procs: list[Any], conns: list[Any], group: TensorParallel) -> None:
        self.procs = procs
        self.conns = conns
        self.group = group
        self.writes: list[SlotWrite] = []
        self.closing = False
        self.threads_before = 0
        """The engine process's torch threads before the CPU ranks shared them (restored)."""
        self._watch = threading.Thread(target=self._watch_deaths, daemon=True, name="tp-watch")
        self._watch.start()

    # ---------------------------------------------------------------- steps
    def launch(
        self, step: int, sched: SchedulerOutput, prev: int | None, defer: bool, records_k: int
    ) -> None:
        """Rank 0 launches step ``step`` (placeholders from step ``prev``); ``records_k``: the
        least k of prompt-logprob alternatives (``ModelRunner.prompt_records_k``)."""
        writes = self.writes[:]  # the recorders append to this very list (an adapter unloaded
        del self.writes[: len(writes)]  # from another thread may append meanwhile: kept)
        self._send(("launch", step, sched, prev, defer, writes, records_k))

    def sample(self, step: int) -> None:
        self._send(("sample", step))

    def mirror_lora(self, layers: dict[str, LoRALinear]) -> None:
        """Forward every adapter slot write of rank 0 with the next step."""
        for name, layer in layers.items():
            layer.on_set_slot = _Recorder(self.writes, name)

    def _send(self, msg: tuple[Any, ...]) -> None:
        self.check()
        try:
            data = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)  # once, for every worker
            for conn in self.conns:
                conn.send_bytes(data)
        except (BrokenPipeError, ConnectionError, EOFError) as exc:
            raise TensorParallelError(f"a tensor-parallel worker is gone: {exc}") from exc

    def check(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise TensorParallelError(
                    f"tensor-parallel worker rank {rank} died (exit code {p.exitcode})"
                )

    def _watch_deaths(self) -> None:
        left = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        while left:
            for ready in mpc.wait(list(left)):
                rank = left.pop(ready)
                if self.closing:
                    continue
                code = self.procs[rank - 1].exitcode
                log.critical("tensor-parallel worker rank %d died (exit code %s)", rank, code)
                if self.group.backend == "nccl" and self.group.pg is not None:
                    with contextlib.suppress(Exception):
                        self.group.pg.abort()  # waiting collectives fail now
                    nccl = self.group.nccl
                    if nccl is not None:  # the model's all-reduces return (abort may block)
                        threading.Thread(target=nccl.abort, daemon=True).start()

    # ---------------------------------------------------------------- shutdown
    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (asked, then terminated, then killed) and drop the group."""
        if self.closing:
            return
        self.closing = True
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send_bytes(pickle.dumps(("stop",)))
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.group.close()
        if self.threads_before:
            torch.set_num_threads(self.threads_before)


class _Recorder:
    def __init__(self, out: list[SlotWrite], name: str) -> None:
        self.out, self.name = out, name

    def __call__(self, slot: int, weights: Factors | None) -> None:
        # as numpy arrays: pickled by value (torch tensors would go through shared memory, one
        # file descriptor each)
        plain = None
        if weights is not None:
            plain = {s: (_array(a), _array(b)) for s, (a, b) in weights.items()}
        self.out.append((self.name, slot, plain))


def _array(t: torch.Tensor) -> Any:
    return t.detach().float().cpu().numpy()


def start_workers(
    config: EngineConfig, folder: Path, device: torch.device
) -> tuple[Workers, TensorParallel]:
    """Spawn ranks 1..N-1 and build the group with them; the caller (rank 0) then builds its
    shard and runner, and calls ``wait_ready``."""
    world = config.model.tensor_parallel_size
    threads, before = 0, torch.get_num_threads()
    if device.type == "cpu":  # the ranks share the cores: each takes its part of the threads
        threads = max(1, before // world)
        torch.set_num_threads(threads)
        log.info("tensor parallelism on CPU: %d threads per rank", threads)
    store = host_store(world)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, world):
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=worker_main,
            args=(rank, world, store.port, config, str(folder), device.type, threads, child),
            name=f"truffula-tp{rank}",
            daemon=True,
        )
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    try:
        for rank, (p, conn) in enumerate(zip(procs, conns, strict=True), start=1):
            _expect(p, conn, rank, "hello")
        try:
            group = connect(0, world, device_for(device, 0), store)
        except Exception as exc:  # a rank that never joined: the store's timeout
            raise TensorParallelError(
                f"the tensor-parallel group of {world} ranks did not form within "
                f"{timeout_s():g} s ({TIMEOUT_ENV}): {exc}"
            ) from exc
    except BaseException:
        for p in procs:
            p.kill()
        torch.set_num_threads(before)
        raise
    workers = Workers(procs, conns, group)
    workers.threads_before = before if threads else 0
    return workers, group


def wait_ready(workers: Workers) -> None:
    """Wait until every worker has built its runner (or raise its error)."""
    for rank, (p, conn) in enumerate(zip(workers.procs, workers.conns, strict=True), start=1):
        _expect(p, conn, rank, "ready")


def _expect(p: Any, conn: Any, rank: int, what: str) -> None:
    """Wait for ``what`` from a worker for as long as it lives (its steps have timeouts)."""
    hint = ""
    if what == "hello":  # a worker gone before its hello died importing the main module
        hint = (
            " (a script that starts a tensor-parallel engine must do so under "
            "`if __name__ == '__main__':`: the ranks are spawned processes)"
        )
    while True:
        if conn.poll(0.2):
            try:
                msg = conn.recv()
            except EOFError:
                p.join(5)
                msg = ("error", f"exit code {p.exitcode}{hint}")
            if msg[0] == what:
                return
            raise TensorParallelError(f"tensor-parallel worker rank {rank} failed: {msg[1]}")
        if not p.is_alive():
            raise TensorParallelError(
                f"tensor-parallel worker rank {rank} died while starting (exit code "
                f"{p.exitcode}){hint}"
            )


# -------------------------------------------------------------------- the worker process
def worker_main(
    rank: int,
    world: int,
    port: int,
    config: EngineConfig,
    folder: str,
    device_type: str,
    threads: int,
    conn: Any,
) -> None:
    _die_with_parent()
    if threads:
        torch.set_num_threads(threads)
    level = os.environ.get(envs.TRUFFULA_WORKER_LOG, "WARNING")
    logging.basicConfig(level=level, format=f"tp{rank} %(levelname)s %(message)s")
    code = 0
    try:
        conn.send(("hello",))
        device = device_for(torch.device(device_type), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = connect(rank, world, device, join_store(port, world))
        runner = _build(config, Path(folder), device, group)
        layers = {n: m for n, m in runner.model.named_modules() if isinstance(m, LoRALinear)}
        conn.send(("ready",))
        runner.capture_graphs()  # rank 0 captures the same graphs once the engine is built
        _serve(conn, runner, layers)
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        traceback.print_exc(file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown (a gloo group outliving its store aborts)


def _build(config: EngineConfig, folder: Path, device: torch.device, group: TensorParallel) -> Any:
    from truffula.device import pick_dtype
    from truffula.distributed.runner import TensorParallelRunner
    from truffula.models.registry import load_model

    dtype = pick_dtype(config.model.dtype, device)
    dummy = config.model.load_format == "dummy"
    loaded = load_model(
        folder, dtype, device, config.model.max_model_len, shard=group, random_weights=dummy
    )
    lora = config.lora
    apply_lora(loaded.model, lora.max_active_adapters, lora.max_lora_rank, dtype, device)
    return TensorParallelRunner(loaded, config, device, dtype, group)


def _serve(conn: Any, runner: Any, layers: dict[str, LoRALinear]) -> None:
    from truffula.distributed.runner import StepAborted

    steps: dict[int, Any] = {}
    while True:
        msg = pickle.loads(conn.recv_bytes())
        kind = msg[0]
        if kind == "stop":
            return
        try:
            if kind == "launch":
                _, step, sched, prev, defer, writes, runner.prompt_records_k = msg
                for name, slot, plain in writes:
                    weights = None
                    if plain is not None:
                        weights = {
                            s: (torch.from_numpy(a), torch.from_numpy(b))
                            for s, (a, b) in plain.items()
                        }
                    layers[name].set_slot(slot, weights)
                steps[step] = runner.launch(sched, steps.get(prev), defer)
                for old in [s for s in steps if s < step - 3]:
                    del steps[old]
            elif kind == "sample":
                runner.sample(steps[msg[1]])
        except StepAborted:
            continue  # rank 0 raises the request's error; the ranks stay in step


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies; elsewhere, a pipe's EOF ends it."""
    parent = mp.parent_process()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent.pid:  # it died before the call above
        os._exit(1)
