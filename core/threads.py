"""CPU threads on a shared machine: how many each consumer gets, and how a training worker follows its share.

Two processes that each run every core's worth of threads run several times slower than one: their threads
oversubscribe the cores. Whoever starts the work (the studio) splits the usable cores evenly between what is
running — training workers, evaluation workers, chat replies — with ``share``, and tells a training worker its
share by writing one integer to ``<run>/THREADS`` (``write_share``). The training loop calls
``ThreadShare.follow`` after every optimiser step: one ``stat`` when nothing changed, ``torch.set_num_threads``
when the share did. A worker started with ``OMP_NUM_THREADS`` set begins with that many; without a THREADS file
(the CLI on its own) torch keeps its default, every core.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

THREADS_FILE = "THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; containers and taskset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share(cores: int, consumers: int) -> int:
    """Threads for each of ``consumers`` running at once on ``cores`` cores: an even split, at least one."""
    return max(1, cores // max(1, consumers))


def write_share(run_dir: Path, threads: int) -> None:
    """Tell the worker training in ``run_dir`` to use ``threads`` threads from its next step on."""
    tmp = run_dir / f".{THREADS_FILE}.tmp"
    tmp.write_text(f"{threads}\n")
    tmp.replace(run_dir / THREADS_FILE)  # atomic: the worker never reads half a number


class ThreadShare:
    """The worker's side: applies ``<run>/THREADS`` whenever it changes (CPU runs only)."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.path = run_dir / THREADS_FILE
        self.enabled = device.type == "cpu"
        self._seen: int | None = None  # mtime_ns of the file last applied

    def follow(self) -> int | None:
        """The thread count now applied, or None when there is nothing to apply."""
        if not self.enabled:
            return None
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp == self._seen:
                return None
            self._seen = stamp
            wanted = int(self.path.read_text().strip())
        except (OSError, ValueError):  # absent, being replaced, or not a number: keep the current count
            return None
        threads = min(max(1, wanted), usable_cores())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads


__all__ = ["THREADS_FILE", "ThreadShare", "share", "usable_cores", "write_share"]
