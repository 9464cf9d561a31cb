"""Adapters in host memory and in device slots.

- ``load`` / ``load_merged`` (any thread, blocking: call it off the step loop): resolve an id
  (``local``: a folder under the adapter root, no path or symlink escaping it; ``hub``: the local
  Hugging Face cache, offline), read and validate it against the base model, keep it in host
  memory under its key. Concurrent loads of one id share the work.
- ``acquire`` / ``release`` (the step thread, through the scheduler's admission hooks): pin the
  adapter in a device slot, copying it in if needed and evicting the least recently used
  unpinned slot. An adapter in use is never evicted; when every slot is pinned, the request waits.
- ``add_user`` / ``remove_user``: requests holding an adapter; such an adapter cannot be unloaded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from truffula.adapters.merge import MergeSpec, merge
from truffula.adapters.peft import LoRAWeights, load_peft
from truffula.errors import AdapterError
from truffula.layers.lora import LoRALinear

log = logging.getLogger("truffula.adapters")
SOURCES = ("local", "hub")


class AdapterStore:
    def __init__(
        self,
        layers: dict[str, LoRALinear],
        packed: dict[str, tuple[str, str]],
        num_slots: int,
        max_rank: int,
        adapter_root: str | None,
    ) -> None:
        self.layers = layers
        self.targets = {name: layer.base for name, layer in layers.items()}
        self.packed = packed
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.root = Path(adapter_root or os.getcwd()).resolve()
        self.host: dict[str, LoRAWeights] = {}
        self.slot_of: dict[str, int] = {}
        self.key_in_slot: list[str | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.users: dict[str, int] = {}
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Event] = {}
        self.on_load: Callable[[], None] | None = None
        self.on_evict: Callable[[], None] | None = None

    # ---------------------------------------------------------------- host side
    @property
    def num_active(self) -> int:
        return sum(1 for k in self.key_in_slot if k is not None)

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return [k for k in self.host if not k.startswith("merge:")]

    def is_loaded(self, key: str) -> bool:
        return key in self.host

    def resolve(self, adapter_id: str, source: str | None) -> Path:
        if source is not None and source not in SOURCES:
            raise AdapterError(f"adapter_source {source!r} is not supported (local, hub)", 422)
        local = None if source == "hub" else self._local(adapter_id, must_exist=source == "local")
        if local is not None:
            return local
        if source is None and adapter_id.count("/") != 1:
            raise AdapterError(
                f"adapter {adapter_id!r} not found under the adapter root {self.root}", 404
            )
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(adapter_id, local_files_only=True))
        except Exception as exc:
            raise AdapterError(
                f"adapter {adapter_id!r} is not in the local Hugging Face cache (truffula loads hub "
                "adapters offline; fetch it first)",
                404,
            ) from exc

    def _local(self, adapter_id: str, must_exist: bool) -> Path | None:
        if not adapter_id or "\x00" in adapter_id:
            raise AdapterError("adapter_id must be a non-empty path", 422)
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

    def load(self, adapter_id: str, source: str | None = None) -> str:
        """Read ``adapter_id`` into host memory (blocking); returns its key."""
        if source is not None and source not in SOURCES:
            raise AdapterError(f"adapter_source {source!r} is not supported (local, hub)", 422)
        key = adapter_id
        while True:
            with self._lock:
                if key in self.host:
                    return key
                waiter = self._loading.get(key)
                if waiter is None:
                    done = self._loading[key] = threading.Event()
                    break
            waiter.wait()
        try:
            folder = self.resolve(adapter_id, source)
            weights = load_peft(adapter_id, folder, self.targets, self.packed)
            if weights.rank > self.max_rank:
                raise AdapterError(
                    f"adapter {adapter_id!r} has rank {weights.rank}, above this server's "
                    f"max_lora_rank {self.max_rank}",
                    422,
                )
            with self._lock:
                self.host[key] = weights
            log.info(
                "loaded adapter %s (rank %d, %d modules)",
                adapter_id,
                weights.rank,
                len(weights.modules),
            )
            return key
        finally:
            with self._lock:
                self._loading.pop(key, None)
            done.set()

    def load_merged(self, spec: MergeSpec, source: str | None = None) -> str:
        with self._lock:
            if spec.key in self.host:
                return spec.key
        parts = [self.host[self.load(i, source)] for i in spec.ids]
        merged = merge(spec, parts)
        with self._lock:
            self.host.setdefault(spec.key, merged)
        return spec.key

    def unload(self, key: str) -> None:
        with self._lock:
            if key not in self.host:
                raise AdapterError(f"adapter {key!r} is not loaded", 404)
            if self.users.get(key):
                raise AdapterError(
                    f"adapter {key!r} is serving {self.users[key]} request(s); unload it later", 409
                )
            del self.host[key]
            slot = self.slot_of.pop(key, None)
            if slot is not None:
                self._clear(slot)

    def add_user(self, key: str) -> None:
        with self._lock:
            if key not in self.host:
                raise AdapterError(f"adapter {key!r} is not loaded", 404)
            self.users[key] = self.users.get(key, 0) + 1

    def remove_user(self, key: str) -> None:
        with self._lock:
            left = self.users.get(key, 0) - 1
            if left > 0:
                self.users[key] = left
            else:
                self.users.pop(key, None)

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
