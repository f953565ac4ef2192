"""What the studio reads from a worker's run folder: metrics.jsonl events, status.json and the log tail.

The event schema and its readers are core.events (the engine writes the files, so it owns their format); this
module adds what only the studio needs: one incremental reader per run folder shared by every browser session,
and the tail of the worker's log. The names re-exported here (MetricsTail, read_events, of_type, read_status,
summarize) are core.events' own.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from core.events import METRICS_FILE, MetricsTail, of_type, read_events, read_status, summarize


class MetricsCache:
    """One MetricsTail per run folder, shared by every browser session (the files are shared data)."""

    def __init__(self) -> None:
        self._tails: dict[Path, MetricsTail] = {}
        self._lock = threading.Lock()

    def events(self, run_dir: Path) -> list[dict[str, Any]]:
        with self._lock:
            tail = self._tails.get(run_dir)
            if tail is None:
                tail = self._tails[run_dir] = MetricsTail(run_dir / METRICS_FILE)
        return tail.read()

    def forget(self, run_dir: Path) -> None:
        with self._lock:
            self._tails.pop(run_dir, None)


def tail_lines(path: Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``n`` lines of a text file, reading at most ``max_bytes`` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first line is probably cut
    return lines[-n:]


def log_tail(run_dir: Path, n: int = 20) -> str:
    """Last lines of the worker's output (worker.log: every train.log line plus warnings and tracebacks),
    or of train.log when the worker was started elsewhere (the CLI)."""
    for name in ("worker.log", "train.log"):
        lines = tail_lines(run_dir / name, n)
        if lines:
            return "\n".join(lines)
    return ""


__all__ = ["MetricsCache", "MetricsTail", "log_tail", "of_type", "read_events", "read_status", "summarize",
           "tail_lines"]
