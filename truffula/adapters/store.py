"""Adapters in host memory and in device slots.

- ``load`` / ``load_merged`` (any thread, blocking: call it off the step loop): resolve an id
  (``local``: a folder under the adapter root, no path or symlink escaping it, nor any file read
  in it; ``hub``: the local Hugging Face cache, offline), read and validate it against the base
  model, keep it in host memory under its key. Keys are canonical: a local adapter's key is its
  resolved folder relative to the root (``french``, ``./french``, ``french/./.`` and a symlink
  to it are one adapter, stored once), a hub adapter's key its id, a merge's key ``merge:`` and
  its specification over its adapters' keys. Concurrent loads of one key share the work.
- Host copies are bounded (``max_cpu_adapters``): after each load, the least recently used copies
  that no request holds are dropped, sparing those used in the last ``HOST_GRACE_S`` seconds
  unless the store holds twice the bound. A dropped adapter is read again on its next use.
- ``acquire`` / ``release`` (the step thread, through the scheduler's admission hooks): pin the
  adapter in a device slot, copying it in if needed and evicting the least recently used
  unpinned slot. An adapter in use is never evicted; when every slot is pinned, the request waits.
- ``add_user`` / ``remove_user``: requests holding an adapter; such an adapter is never dropped
  from host memory and cannot be unloaded. ``add_user`` takes any spelling, reads again an
  adapter dropped (or unloaded) between its load and the request's arrival, and counts the
  request under the lock that ``unload`` and the host trim take, so neither can slip between
  the read and the count; it returns the key the request must use from then on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from truffula.adapters.merge import KEY_PREFIX, MergeSpec, check_adapter_id, merge
from truffula.adapters.peft import LoRAWeights, load_peft
from truffula.config import LoRAConfig
from truffula.errors import AdapterError, EngineOverloadedError, RequestValidationError
from truffula.layers.lora import LoRALinear

log = logging.getLogger("truffula.adapters")
SOURCES = ("local", "hub")


class AdapterStore:
    HOST_GRACE_S = 10.0
    """A host copy used this recently is dropped only when the store holds twice its bound
    (the time between a request's load and its arrival at the engine)."""

    def __init__(
        self,
        layers: dict[str, LoRALinear],
        packed: dict[str, tuple[str, str]],
        num_slots: int,
        max_rank: int,
        adapter_root: str | None,
        *,
        max_cpu_adapters: int | None = None,
        max_merged_adapters: int | None = None,
    ) -> None:
        defaults = LoRAConfig()
        self.layers = layers
        self.targets = {name: layer.base for name, layer in layers.items()}
        self.packed = packed
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.max_cpu_adapters = max_cpu_adapters or defaults.max_cpu_adapters
        self.max_merged_adapters = max_merged_adapters or defaults.max_merged_adapters
        self.root = Path(adapter_root or os.getcwd()).resolve()
        self.host: OrderedDict[str, LoRAWeights] = OrderedDict()
        """key -> weights, least recently used first."""
        self._used_at: dict[str, float] = {}
        self.slot_of: dict[str, int] = {}
        self.key_in_slot: list[str | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.users: dict[str, int] = {}
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Event] = {}
        self.on_load: Callable[[], None] | None = None
        self.on_evict: Callable[[], None] | None = None
        self.host_evictions = 0

    # ---------------------------------------------------------------- host side
    @property
    def num_active(self) -> int:
        return sum(1 for k in self.key_in_slot if k is not None)

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return [k for k in self.host if not k.startswith(KEY_PREFIX)]

    def listing(self) -> list[dict[str, Any]]:
        """One consistent snapshot of the adapters in host memory (merges left out)."""
        with self._lock:
            return [
                {
                    "id": key,
                    "rank": w.rank,
                    "modules": len(w.modules),
                    "active": key in self.slot_of,
                    "slot": self.slot_of.get(key),
                    "requests": self.users.get(key, 0),
                }
                for key, w in self.host.items()
                if not key.startswith(KEY_PREFIX)
            ]

    def is_loaded(self, key: str) -> bool:
        return key in self.host

    def resolve(self, adapter_id: str, source: str | None) -> Path:
        """The folder ``adapter_id`` names (see ``key_of`` for its key)."""
        return self._locate(adapter_id, source)[1]

    def key_of(self, adapter_id: str, source: str | None = None) -> str:
        """The key ``adapter_id`` is (or would be) stored under; reads no adapter file."""
        if isinstance(adapter_id, str) and adapter_id.startswith(KEY_PREFIX):
            spec = self._spec_of_key(adapter_id)
            return replace(spec, ids=tuple(self.key_of(i, source) for i in spec.ids)).key
        return self._locate(adapter_id, source)[0]

    def _locate(self, adapter_id: str, source: str | None) -> tuple[str, Path, Path]:
        """(key, folder, the folder every file read must resolve inside)."""
        if source is not None and source not in SOURCES:
            raise AdapterError(
                f"adapter_source {str(source)[:60]!r} is not supported (local, hub)", 422
            )
        try:
            check_adapter_id(adapter_id)
        except RequestValidationError as exc:
            raise AdapterError(str(exc), 422) from None
        try:
            if source != "hub":
                local = self._local(adapter_id, must_exist=source == "local")
                if local is not None:
                    return local.relative_to(self.root).as_posix(), local, self.root
            if source is None and adapter_id.count("/") != 1:
                raise AdapterError(
                    f"adapter {adapter_id!r} not found under the adapter root {self.root}", 404
                )
        except (OSError, RuntimeError, ValueError) as exc:  # a name too long, a symlink loop
            reason = getattr(exc, "strerror", None) or exc
            raise AdapterError(
                f"adapter id {adapter_id!r} is not a usable path: {reason}", 422
            ) from exc
        folder = self._hub(adapter_id)
        # a snapshot's files are symlinks into the repository's blobs/
        files_root = folder.parent.parent if folder.parent.name == "snapshots" else folder
        return adapter_id, folder, files_root

    def _hub(self, adapter_id: str) -> Path:
        from truffula.errors import ModelLoadError
        from truffula.model_store.hub import ADAPTER_PATTERNS, hub_snapshot, missing_adapter_files

        try:
            return hub_snapshot(
                adapter_id, ADAPTER_PATTERNS, missing_adapter_files, "adapter", progress=False
            )
        except ModelLoadError as exc:
            raise AdapterError(str(exc), 404) from exc

    def _local(self, adapter_id: str, must_exist: bool) -> Path | None:
        path = (self.root / adapter_id).resolve()
        if path != self.root and self.root not in path.parents:
            raise AdapterError(
                f"adapter {adapter_id!r} resolves outside the adapter root; refused", 403
            )
        if path.is_dir():
            return path
        if must_exist:
            raise AdapterError(
                f"adapter {adapter_id!r} not found under the adapter root {self.root}", 404
            )
        return None

    def _spec_of_key(self, key: str) -> MergeSpec:
        return MergeSpec.from_key(key, self.max_merged_adapters)

    def load(self, adapter_id: str, source: str | None = None) -> str:
        """Read ``adapter_id`` into host memory (blocking); returns its key."""
        return self._load(adapter_id, source)[0]

    def _load(self, adapter_id: str, source: str | None) -> tuple[str, LoRAWeights]:
        if source is not None and source not in SOURCES:
            raise AdapterError(
                f"adapter_source {str(source)[:60]!r} is not supported (local, hub)", 422
            )
        if isinstance(adapter_id, str) and adapter_id.startswith(KEY_PREFIX):
            return self._load_merged(self._spec_of_key(adapter_id), source)
        if isinstance(adapter_id, str):
            with self._lock:
                weights = self.host.get(adapter_id)
                if weights is not None:  # already a key
                    self._touch(adapter_id)
                    return adapter_id, weights
        key, folder, files_root = self._locate(adapter_id, source)
        return key, self._once(key, lambda: self._read(adapter_id, folder, files_root))

    def _read(self, adapter_id: str, folder: Path, files_root: Path) -> LoRAWeights:
        try:
            weights = load_peft(adapter_id, folder, self.targets, self.packed, root=files_root)
        except AdapterError:
            raise
        except Exception as exc:  # whatever else a malformed adapter makes torch raise
            log.warning("adapter %r cannot be loaded", adapter_id, exc_info=True)
            raise AdapterError(
                f"adapter {adapter_id!r} cannot be loaded: {type(exc).__name__}: {exc}", 422
            ) from exc
        if weights.rank > self.max_rank:
            raise AdapterError(
                f"adapter {adapter_id!r} has rank {weights.rank}, above this server's "
                f"max_lora_rank {self.max_rank}",
                422,
            )
        log.info(
            "loaded adapter %s (rank %d, %d modules)",
            adapter_id,
            weights.rank,
            len(weights.modules),
        )
        return weights

    def load_merged(self, spec: MergeSpec, source: str | None = None) -> str:
        return self._load_merged(spec, source)[0]

    def _load_merged(self, spec: MergeSpec, source: str | None) -> tuple[str, LoRAWeights]:
        if len(spec.ids) > self.max_merged_adapters:
            raise RequestValidationError(
                "merged_adapters",
                f"`merged_adapters.ids` may name at most {self.max_merged_adapters} adapters. "
                f"Given: {len(spec.ids)}",
            )
        with self._lock:
            weights = self.host.get(spec.key)
            if weights is not None:
                self._touch(spec.key)
                return spec.key, weights
        parts = [self._load(i, source) for i in spec.ids]
        canonical = replace(spec, ids=tuple(key for key, _ in parts))
        adapters = [w for _, w in parts]
        return canonical.key, self._once(canonical.key, lambda: merge(canonical, adapters))

    def _once(self, key: str, build: Callable[[], LoRAWeights]) -> LoRAWeights:
        """The host copy of ``key``, built once however many threads ask at the same time."""
        while True:
            with self._lock:
                weights = self.host.get(key)
                if weights is not None:
                    self._touch(key)
                    return weights
                waiter = self._loading.get(key)
                if waiter is None:
                    done = self._loading[key] = threading.Event()
                    break
            waiter.wait()
        try:
            weights = build()
            weights.adapter_id = key
            with self._lock:
                self.host[key] = weights
                self._touch(key)
                self._trim_host(keep=key)
            return weights
        finally:
            with self._lock:
                self._loading.pop(key, None)
            done.set()

    def _touch(self, key: str) -> None:
        self.host.move_to_end(key)
        self._used_at[key] = time.monotonic()

    def _trim_host(self, keep: str) -> None:
        """Drop least recently used copies that no request holds, down to ``max_cpu_adapters``
        (sparing the recently used ones), then, past twice that, down to twice that."""
        now = time.monotonic()
        for limit, grace in (
            (self.max_cpu_adapters, self.HOST_GRACE_S),
            (2 * self.max_cpu_adapters, 0.0),
        ):
            for key in list(self.host):
                if len(self.host) <= limit:
                    break
                slot = self.slot_of.get(key)
                if (
                    key == keep
                    or self.users.get(key)
                    or (slot is not None and self.pins[slot] > 0)
                    or now - self._used_at.get(key, 0.0) < grace
                ):
                    continue
                # the device slot, if any, keeps its copy until the slot LRU reuses it
                del self.host[key]
                self._used_at.pop(key, None)
                self.host_evictions += 1
                log.info("dropped adapter %s from host memory (max_cpu_adapters)", key[:80])

    def unload(self, adapter_id: str) -> None:
        with self._lock:
            known = adapter_id in self.host or adapter_id in self.slot_of
        key = adapter_id
        if not known:
            try:
                key = self.key_of(adapter_id)
            except (AdapterError, RequestValidationError):
                key = adapter_id
        with self._lock:
            if key not in self.host and key not in self.slot_of:
                raise AdapterError(f"adapter {str(adapter_id)[:300]!r} is not loaded", 404)
            if self.users.get(key):
                raise AdapterError(
                    f"adapter {key!r} is serving {self.users[key]} request(s); unload it later", 409
                )
            self.host.pop(key, None)
            self._used_at.pop(key, None)
            slot = self.slot_of.pop(key, None)
            if slot is not None:
                self._clear(slot)

    def add_user(self, adapter_id: str) -> str:
        """Count a request holding ``adapter_id`` (a key or any spelling of one) and return its
        key; a copy dropped or unloaded since the request's load is read again."""
        for _ in range(3):
            key = self.load(adapter_id)
            with self._lock:
                if key in self.host:  # a trim in another thread may have dropped it again
                    self.users[key] = self.users.get(key, 0) + 1
                    self._touch(key)
                    return key
        raise EngineOverloadedError(
            f"adapter {str(adapter_id)[:300]!r} was dropped from host memory three times in a row "
            "(more adapters in use than --max-cpu-adapters)"
        )

    def remove_user(self, key: str) -> None:
        with self._lock:
            left = self.users.get(key, 0) - 1
            if left > 0:
                self.users[key] = left
            else:
                self.users.pop(key, None)
            if key in self.host:
                self._touch(key)

    # ---------------------------------------------------------------- device slots
    def acquire(self, key: str) -> int | None:
        """Pin ``key`` in a device slot (loading it into one if needed); None when all are pinned."""
        with self._lock:
            slot = self.slot_of.get(key)
            if slot is None:
                slot = self._free_slot()
                if slot is None:
                    return None
                weights = self.host[key]
                for name, layer in self.layers.items():
                    layer.set_slot(slot, weights.modules.get(name))
                self.slot_of[key] = slot
                self.key_in_slot[slot] = key
                if self.on_load is not None:
                    self.on_load()
            self.pins[slot] += 1
            self.recent.pop(slot, None)
            self.recent[slot] = None
            return slot

    def release(self, key: str) -> None:
        with self._lock:
            slot = self.slot_of.get(key)
            if slot is not None and self.pins[slot] > 0:
                self.pins[slot] -= 1

    def _free_slot(self) -> int | None:
        for slot, k in enumerate(self.key_in_slot):
            if k is None:
                return slot
        for slot in self.recent:  # least recently used first
            if self.pins[slot] == 0:
                old = self.key_in_slot[slot]
                if old is not None:
                    self.slot_of.pop(old, None)
                    if self.on_evict is not None:
                        self.on_evict()
                self._clear(slot)
                return slot
        return None

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if layer.loaded[slot]:
                layer.set_slot(slot, None)
        self.key_in_slot[slot] = None
        self.recent.pop(slot, None)
