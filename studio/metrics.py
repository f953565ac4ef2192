"""Read what a worker writes into its run folder: metrics.jsonl events, status.json and the log tail.

metrics.jsonl holds one JSON object per line (schema in core/train.py):
    {"type": "start", total_steps, trainable, total_params, method, device, num_layers, groups: [{name, depth}]}
    {"type": "step", step, epoch, loss, lr: {group: lr}, lr_by_depth: {depth: lr}, grad_norm: {block: norm},
     tokens_per_s, elapsed_s, eta_s, total_steps}
    {"type": "eval", step, eval_loss}
    {"type": "end", status, reason}
The file grows while we read it, so the reader is incremental and ignores a half-written last line.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any



class MetricsTail:
    """Incremental reader of one metrics.jsonl: each ``read()`` parses only the bytes added since the last."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._inode: int | None = None
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                return list(self.events)
            size = st.st_size
            if st.st_ino != self._inode or size < self._offset:  # replaced (a resume rewrites it) or truncated
                self.events, self._offset, self._inode = [], 0, st.st_ino
            if size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read(size - self._offset)
                end = chunk.rfind(b"\n") + 1  # only complete lines
                for line in chunk[:end].splitlines():
                    event = _parse(line)
                    if event is not None:
                        self.events.append(event)
                self._offset += end
            return list(self.events)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


class MetricsCache:
    """One MetricsTail per run folder, shared by every browser session (the files are shared data)."""

    def __init__(self) -> None:
        self._tails: dict[Path, MetricsTail] = {}
        self._lock = threading.Lock()

    def events(self, run_dir: Path) -> list[dict[str, Any]]:
        with self._lock:
            tail = self._tails.get(run_dir)
            if tail is None:
                tail = self._tails[run_dir] = MetricsTail(run_dir / "metrics.jsonl")
        return tail.read()

    def forget(self, run_dir: Path) -> None:
        with self._lock:
            self._tails.pop(run_dir, None)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    return MetricsTail(path).read()


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == kind]


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers for the registry and the progress line: trainable/total params, steps, last losses, speed."""
    out: dict[str, Any] = {}
    starts = of_type(events, "start")
    if starts:
        s = starts[-1]
        out["trainable"] = s.get("trainable")
        out["total_params"] = s.get("total_params")
        out["total_steps"] = s.get("total_steps")
    steps = of_type(events, "step")
    if steps:
        last = steps[-1]
        out["steps"] = last.get("step")
        out["final_loss"] = _finite(last.get("loss"))
        out["total_steps"] = last.get("total_steps") or out.get("total_steps")
        for key in ("epoch", "tokens_per_s", "elapsed_s", "eta_s"):
            out[key] = _finite(last.get(key))
    evals = [e for e in of_type(events, "eval") if _finite(e.get("eval_loss")) is not None]
    if evals:
        out["final_eval_loss"] = _finite(evals[-1]["eval_loss"])
    ends = of_type(events, "end")
    if ends:
        out["end_status"] = ends[-1].get("status")
        out["end_reason"] = ends[-1].get("reason") or ""
    return out


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json as a dict, or {} when missing or half-written."""
    try:
        data = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


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
