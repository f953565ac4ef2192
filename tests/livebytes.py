"""Peak bytes of live tensor storage, counted at the dispatcher: what a run really holds, on any device.

    with LiveBytes(model) as mem:      # the model's weights count from the start
        ... train ...
    mem.peak                           # the most bytes alive at once

Every tensor an operator returns is counted once per storage, until that storage is freed (a weak reference
to it expires). Allocator caching and fragmentation are not counted: this is the memory the program asks for,
the quantity the studio's estimate (studio.estimate) predicts."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self, model: torch.nn.Module | None = None):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage pointer -> (weak ref, bytes)
        self._bytes = 0  # an upper bound: expired storages leave only when swept
        self.peak = 0
        for t in [*model.parameters(), *model.buffers()] if model is not None else []:
            self._track(t)
        self.peak = self._sweep()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or (key in self._live and not self._live[key][0].expired()):
            return
        if key in self._live:
            self._bytes -= self._live[key][1]
        self._live[key] = (StorageWeakRef(storage), size)
        self._bytes += size
        if self._bytes > self.peak:  # only a possible new peak needs the exact count
            self.peak = max(self.peak, self._sweep())

    def _sweep(self) -> int:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self._bytes -= self._live.pop(key)[1]
        return self._bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out
