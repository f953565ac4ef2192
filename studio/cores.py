"""The studio's split of the CPU cores between what runs at once: training workers, evaluation workers and chat.

Each consumer joins while it runs and leaves when it ends; every change re-splits the cores evenly
(core.threads.share) and writes each training worker's new share to its ``<run>/THREADS`` file, which the worker
applies after its current step. On 2 cores a training run alone gets both. A chat reply takes an even share only
while nothing trains; while a run trains, the reply yields to it instead (studio.chat.in_background: one thread
at a low priority) and the run keeps every core. Evaluation workers get their share when they start
(OMP_NUM_THREADS) and keep it. GPU workers do not count: their work is on the GPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.threads import share, usable_cores, write_share

log = logging.getLogger(__name__)


class CoreShare:
    def __init__(self, cores: int | None = None):
        self.cores = cores or usable_cores()
        self._holders: dict[str, Path | None] = {}  # consumer key -> run folder of a training worker, else None
        self._lock = threading.Lock()

    def threads(self) -> int:
        """Each consumer's share now."""
        with self._lock:
            return share(self.cores, len(self._holders))

    def join(self, key: str, run_dir: Path | None = None) -> int:
        """``key`` starts using the CPU (``run_dir``: a training worker that follows its THREADS file)."""
        with self._lock:
            self._holders[key] = run_dir
            return self._publish()

    def leave(self, key: str) -> None:
        with self._lock:
            self._holders.pop(key, None)
            self._publish()

    def training(self) -> bool:
        """Whether a training worker holds a share now."""
        with self._lock:
            return any(run_dir is not None for run_dir in self._holders.values())

    @contextmanager
    def held(self, key: str) -> Iterator[int]:
        """For the duration of a chat reply or an evaluation: yields its thread count."""
        n = self.join(key)
        try:
            yield n
        finally:
            self.leave(key)

    def _publish(self) -> int:
        n = share(self.cores, len(self._holders))
        for run_dir in self._holders.values():
            if run_dir is not None:
                try:
                    write_share(run_dir, n)
                except OSError as e:  # a deleted run folder: its worker is ending anyway
                    log.warning("could not write the thread share of %s: %s", run_dir, e)
        return n


__all__ = ["CoreShare"]
