"""How the engine process (rank 0) starts a tensor-parallel engine: refuse what cannot be
sharded before anything is spawned, spawn the other ranks, and build rank 0's runner once its
shard is loaded (``truffula.engine.core.EngineCore``)."""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from truffula.adapters.store import AdapterStore
from truffula.config import EngineConfig
from truffula.distributed.parallel import TensorParallel
from truffula.distributed.runner import TensorParallelRunner
from truffula.distributed.workers import Workers, start_workers, wait_ready
from truffula.models.registry import LoadedModel, load_model, native_architectures
from truffula.models.sharding import FLAG, check_shardable
from truffula.runner.runner import ModelRunner

log = logging.getLogger("truffula.distributed")


def check_tensor_parallel(
    config: EngineConfig,
    folder: Path,
    device: torch.device,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Raise ValueError (naming ``--tensor-parallel-size``) for what is not supported yet."""
    n = config.model.tensor_parallel_size
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{FLAG} {n}: runs on CPU (gloo) or CUDA (NCCL), not {device.type}")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"{FLAG} {n}: rank r runs on cuda:r; give --device cuda, not {device}")
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(
            f"{FLAG} {n}: only {torch.cuda.device_count()} GPU(s) are visible (one per rank)"
        )
    if weights is not None:
        raise ValueError(f"{FLAG} {n}: weights given in memory cannot be sharded; use a folder")
    if config.scheduler.speculative is not None:
        raise ValueError(f"{FLAG} {n}: speculative decoding is not supported with it yet")
    from truffula.model_store.resolve import read_config

    raw: dict[str, Any] = read_config(folder)
    arch = (raw.get("architectures") or ["(none)"])[0]
    if arch not in native_architectures():
        raise ValueError(
            f"{FLAG} {n}: {arch} would be served through transformers (the fallback), which "
            f"cannot be sharded; serve it with {FLAG} 1"
        )
    check_shardable(arch, _Config(raw), n)


class _Config(SimpleNamespace):
    """config.json's fields as attributes (None where absent, as ``getattr`` defaults read)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__(**raw)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class Ranks:
    """The engine's processes: this one alone (``tensor_parallel_size`` 1: ``load`` and
    ``runner`` are ``load_model`` and ``ModelRunner``, nothing else runs), or rank 0 of a
    tensor-parallel group with its workers."""

    def __init__(self, workers: Workers | None = None, group: TensorParallel | None = None):
        self.workers = workers
        self.group = group

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        folder: Path,
        device: torch.device,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> Ranks:
        """Refuse what cannot be sharded, then spawn ranks 1..N-1 and join their group."""
        n = config.model.tensor_parallel_size
        if n == 1:
            return cls()
        check_tensor_parallel(config, folder, device, weights)
        log.info("tensor parallelism: %d ranks on %s (%s)", n, device.type, _backend(device))
        workers, group = start_workers(config, folder, device)
        atexit.register(workers.close)
        return cls(workers, group)

    def load(
        self,
        folder: Path,
        dtype: torch.dtype,
        device: torch.device,
        config: EngineConfig,
        weights: Mapping[str, torch.Tensor] | None,
    ) -> LoadedModel:
        """This rank's model (its shard, under tensor parallelism)."""
        with self._closing_on_error():
            return load_model(
                folder,
                dtype,
                device,
                config.model.max_model_len,
                weights,
                self.group,
                random_weights=config.model.load_format == "dummy",
            )

    def runner(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        adapters: AdapterStore,
    ) -> ModelRunner:
        """This rank's runner; under tensor parallelism, once every rank has built its own,
        with adapter slot writes forwarded to the other ranks at each step."""
        if self.workers is None or self.group is None:
            return ModelRunner(loaded, config, device, dtype)
        with self._closing_on_error():
            runner = TensorParallelRunner(loaded, config, device, dtype, self.group)
            wait_ready(self.workers)
            self.workers.mirror_lora(adapters.layers)
            runner.send = self.workers
            return runner

    def close(self) -> None:
        """Stop the other ranks (also done at exit)."""
        if self.workers is not None:
            self.workers.close()

    @contextlib.contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise


def _backend(device: torch.device) -> str:
    return "NCCL" if device.type == "cuda" else "gloo"
