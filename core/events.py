"""What a run folder says about its run: the metric events of ``metrics.jsonl`` and the ``status.json`` record.

One typed schema, written by core.train and read by the studio (charts, progress line, registry) and the CLI.
Events are plain JSON objects (dicts), one per line of ``<run>/metrics.jsonl``; the TypedDicts below name their
fields and types:

    start   once per session, before the first step (a resumed run appends a second one)
    step    every ``log_every`` optimiser steps and at the last one
    eval    every ``eval_every`` steps (eval_loss) and at the end, when there is a validation set (then with
            every metric of core.evaluate: ``EvalEvent``); ``python -m core eval`` appends one more
    end     once, when the session ends (``interrupted`` only from ``recover_status``)

Field meanings:

    step          optimiser steps done (1-based in "step" events); checkpoints are named after it
    epoch         passes over the training set so far, a float (2.5 = half-way through the third epoch)
    loss          mean cross-entropy per supervised token over the step's global batch (all micro-batches
                  and ranks), the same normalisation the gradient uses
    lr            the learning rate each optimiser group used at this step (0 while gradual unfreezing holds
                  the group back); lr_by_depth keys are core.blocks depths as strings ("-1" embeddings, "0".."L-1"
                  blocks, "L" head) or "prompt" for method-owned parameters
    grad_norm     L2 norm of the gradient (before clipping) per block, labelled by core.blocks.depth_label
                  ("embed", "block 0" .. "head", "prompt"), plus "total"
    tokens_per_s  supervised tokens per second since the previous step event
    supervised_tokens  supervised tokens trained on so far (all sessions of the run)
    peak_mem_mb   the worker's peak memory so far in MiB (core.models.peak_memory_bytes: CUDA allocations on a
                  GPU, the process's peak resident set on CPU)
    eta_s         seconds left, extrapolated from this session's steps

``<run>/status.json`` (``Status``) is rewritten atomically at every event. A worker killed outright (SIGKILL,
the OOM killer) cannot say so: ``recover_status`` turns the "running" of a dead pid into "interrupted", with
the last metrics, and appends the only "interrupted" end event.

Readers never fail on what a crash leaves behind: a half-written last line is skipped, a missing or cut-off
status.json reads as ``{}``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypedDict

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"

EndStatus = Literal["completed", "stopped", "failed", "interrupted"]
RunStatus = Literal["running", "completed", "stopped", "failed", "interrupted"]
END_STATUSES: tuple[str, ...] = ("completed", "stopped", "failed", "interrupted")


class Group(TypedDict):
    name: str  # core.schedules.param_groups name: depth label, plus " (no decay)"
    depth: int | None


class StartEvent(TypedDict):
    type: Literal["start"]
    step: int  # where this session starts (0, or the checkpoint's step on resume)
    total_steps: int
    trainable: int
    total_params: int
    method: str
    device: str
    world_size: int
    num_layers: int
    groups: list[Group]
    train_examples: int
    val_examples: int
    resumed_from: int | None


class StepEvent(TypedDict):
    type: Literal["step"]
    step: int
    epoch: float
    loss: float
    lr: dict[str, float]  # {group name: lr}
    lr_by_depth: dict[str, float]  # {"-1".."L" or "prompt": lr}
    grad_norm: dict[str, float]  # {block label or "total": L2 norm}
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    total_steps: int
    supervised_tokens: int
    peak_mem_mb: float


class _EvalBase(TypedDict):
    type: Literal["eval"]
    step: int
    eval_loss: float


class EvalEvent(_EvalBase, total=False):
    """A periodic eval has the three fields above. The end-of-run eval (and ``python -m core eval``) adds every
    metric core.evaluate computes for the dataset's format; a metric that does not apply is left out."""

    format: str  # the dataset format (core.data.FORMATS)
    perplexity: float  # exp(eval_loss)
    token_accuracy: float  # teacher-forced argmax accuracy at supervised positions
    exact_match: float  # instruction / qa / conversation: means over the answered rows
    contains: float
    rouge_l: float
    token_f1: float
    accuracy: float  # classification
    macro_f1: float
    labels: list[str]  # classification: the labels seen in training
    confusion: dict[str, dict[str, int]]  # classification: {reference label: {predicted label: rows}}
    task_metric: str  # the headline metric's name (core.evaluate.TASK_METRIC), task_score its value
    task_score: float
    eval_rows: int  # held-out rows the task metric covers
    eval_s: float  # seconds the evaluation took
    data: str  # only from ``python -m core eval --data F``: the file evaluated instead of the validation split


EVAL_METRICS = ("perplexity", "token_accuracy", "exact_match", "contains", "rouge_l", "token_f1", "accuracy",
                "macro_f1", "task_metric", "task_score", "eval_rows", "eval_s")  # the numbers the registry keeps


class EndEvent(TypedDict):
    type: Literal["end"]
    step: int
    status: EndStatus
    reason: str


Event = StartEvent | StepEvent | EvalEvent | EndEvent


class LastMetrics(TypedDict, total=False):
    step: int
    epoch: float
    loss: float
    elapsed_s: float
    eval_loss: float


class _StatusBase(TypedDict):
    status: RunStatus
    step: int
    total_steps: int
    reason: str
    pid: int
    updated: float  # time.time() of the write


class Status(_StatusBase, total=False):
    """status.json. ``last_metrics`` and ``checkpoint`` ("step-N" or None) only in an ``interrupted`` record."""

    last_metrics: LastMetrics
    checkpoint: str | None


# ---- reading ------------------------------------------------------------------------------------------------


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One metrics.jsonl line as an event, or None for a cut-off or foreign line."""
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


class MetricsTail:
    """Incremental reader of one metrics.jsonl: each ``read()`` parses only the complete lines added since the
    last one. A file replaced (a resume rewrites it) or truncated is read again from the start."""

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
            if st.st_ino != self._inode or st.st_size < self._offset:
                self.events, self._offset, self._inode = [], 0, st.st_ino
            if st.st_size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read(st.st_size - self._offset)
                end = chunk.rfind(b"\n") + 1  # only complete lines
                self.events.extend(e for e in map(parse_line, chunk[:end].splitlines()) if e is not None)
                self._offset += end
            return list(self.events)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every complete event of a metrics.jsonl (``path`` is the file or its run folder)."""
    path = Path(path)
    return MetricsTail(path / METRICS_FILE if path.is_dir() else path).read()


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == kind]


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """status.json as a dict (``Status``), or {} when missing, half-written or not an object."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The run so far in a few numbers: trainable/total_params/total_steps (start), steps, final_loss, epoch,
    tokens_per_s, elapsed_s, eta_s (last step), final_eval_loss (last finite eval), eval_metrics (the last eval
    with task metrics: eval_loss and the ``EVAL_METRICS`` it has), end_status/end_reason (end).
    Keys without data are left out; non-finite numbers read as None."""
    out: dict[str, Any] = {}
    for e in events:
        kind = e.get("type")
        if kind == "start":
            out.update({k: e.get(k) for k in ("trainable", "total_params", "total_steps")})
        elif kind == "step":
            out["steps"] = e.get("step")
            out["final_loss"] = finite(e.get("loss"))
            out["total_steps"] = e.get("total_steps") or out.get("total_steps")
            out.update({k: finite(e.get(k)) for k in ("epoch", "tokens_per_s", "elapsed_s", "eta_s")})
        elif kind == "eval" and finite(e.get("eval_loss")) is not None:
            out["final_eval_loss"] = finite(e["eval_loss"])
            if "task_metric" in e:
                out["eval_metrics"] = {"eval_loss": out["final_eval_loss"],
                                       **{k: e[k] for k in EVAL_METRICS if e.get(k) is not None}}
        elif kind == "end":
            out["end_status"], out["end_reason"] = e.get("status"), e.get("reason") or ""
    return out


# ---- describing ---------------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """'42s', '3m 05s', '2h 07m'; '—' for None."""
    if seconds is None:
        return "—"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(e: dict[str, Any]) -> str:
    """One human-readable line per event, for train.log and the CLI."""
    t = e["type"]
    if t == "start":
        return (f"start: {e['method']} on {e['device']} (x{e['world_size']}), {e['trainable']:,} of "
                f"{e['total_params']:,} parameters train, {e['total_steps']} steps"
                + (f", resumed from step {e['resumed_from']}" if e.get("resumed_from") is not None else ""))
    if t == "step":
        lr = max(e["lr"].values()) if e["lr"] else 0.0
        return (f"step {e['step']}/{e['total_steps']}  epoch {e['epoch']:.2f}  loss {e['loss']:.4f}  lr {lr:.2e}  "
                f"grad {e['grad_norm'].get('total', float('nan')):.3f}  {e['tokens_per_s']:.0f} tok/s  "
                f"eta {duration(e['eta_s'])}")
    if t == "eval":
        text = f"eval at step {e['step']}: loss {e['eval_loss']:.4f}"
        if "task_metric" in e and e["task_metric"] != "eval_loss":
            text += f", {e['task_metric']} {e['task_score']:.4f} over {e.get('eval_rows')} answers"
        return text
    return f"end: {e['status']} at step {e['step']} ({e['reason']})"


# ---- writing ------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: readers see the old
    content or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_status(run_dir: Path, status: Status) -> None:
    write_atomic(run_dir / STATUS_FILE, json.dumps(status, indent=2))


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event as a line; after a line a kill cut off, the event starts a line of its own."""
    path = run_dir / METRICS_FILE
    cut = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if cut else "") + json.dumps(event) + "\n")


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ---- a worker that died without a word ----------------------------------------------------------------------


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs: it exists (``kill(pid, 0)``; one we may not signal counts as existing)
    and is not a zombie (dead, not yet reaped by its parent; /proc says state Z). Anything but a positive int
    (None, 0, -1, a bool, a string from a hand-edited status.json) is no live process: ``kill(0)`` and
    ``kill(-1)`` would address process groups, not a process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # larger than pid_t
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) answered


def recover_status(run_dir: str | Path, alive: Callable[[Any], bool] = pid_alive) -> dict[str, Any]:
    """Settle a run whose worker died without a word (SIGKILL, the OOM killer, a crash of the machine).

    When status.json still says running but ``alive(pid)`` is false, status.json is rewritten as
    ``interrupted`` (a ``Status`` with ``last_metrics`` and ``checkpoint``: the newest checkpoint's name, from
    which ``--resume`` continues, or None) and an ``end`` event with status interrupted is appended to
    metrics.jsonl. Returns the run's status: unchanged when the worker lives or the run had already ended,
    {} when there is none."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status.get("status") != "running" or alive(status.get("pid")):
        return status
    events = read_events(run_dir / METRICS_FILE)
    s = summarize(events)
    last: LastMetrics = {}  # type: ignore[assignment]
    steps = of_type(events, "step")
    if steps:
        last.update({k: steps[-1].get(k) for k in ("step", "epoch", "loss", "elapsed_s")})  # type: ignore[misc]
    if "final_eval_loss" in s:
        last["eval_loss"] = s["final_eval_loss"]
    from .checkpoint import latest_checkpoint  # torch: only here, so that readers of events stay light

    newest = latest_checkpoint(run_dir)
    ckpt = newest.name if newest is not None else None
    step = int(last.get("step") or status.get("step") or 0)
    pid = status.get("pid")
    reason = f"the worker (pid {pid}) ended without finishing, after step {step}"
    if finite(last.get("loss")) is not None:
        reason += f" (loss {last['loss']:.4f})"
    reason += f"; resume continues from {ckpt}" if ckpt is not None else "; no checkpoint was saved"
    new: Status = {"status": "interrupted", "step": step, "total_steps": s.get("total_steps") or
                   status.get("total_steps", 0), "reason": reason, "pid": pid, "updated": time.time(),
                   "last_metrics": last, "checkpoint": ckpt}
    end: EndEvent = {"type": "end", "step": step, "status": "interrupted", "reason": reason}
    append_event(run_dir, end)
    write_status(run_dir, new)
    return dict(new)
