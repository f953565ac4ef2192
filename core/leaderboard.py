"""A sweep's leaderboard: one row per run folder, every number read from what the run wrote.

    rows = leaderboard([run_dir, ...])          # list[dict], keys COLUMNS, in run order
    best = best_values(rows)                    # {column: the best value among the rows}
    top = ranked(rows)                          # best run first (task score, then eval loss)
    write_csv(rows, path)

Where each column comes from (``metrics.jsonl``, schema core.events; ``config.yaml``; ``adapter/``):

    task_metric, task_score   the last eval event with task metrics (core.evaluate.TASK_METRIC names the metric of
                              the format: ROUGE-L for instruction/QA/conversation, accuracy for classification,
                              eval loss for plain text)
    eval_loss                 that event's eval_loss (teacher-forced, every validation row)
    trainable, trainable_pct  the start event: trainable parameters, and 100 · trainable / total_params
    train_s                   the last step event's elapsed_s (training only; eval_s is the final evaluation)
    tokens_per_s              supervised_tokens / train_s, both from the last step event
    peak_mem_mb               the last step event's peak_mem_mb (core.models.peak_memory_bytes)
    adapter_mb                the size on disk of the files in ``<run>/adapter/``
    can_merge                 the method's registry flag (core.methods.MethodSpec.can_merge)

A run without an end-of-run eval (failed, stopped, or no validation rows) has those cells empty (None).
"""

from __future__ import annotations

import csv
import os
import threading
from pathlib import Path
from typing import Any

from .evaluate import HIGHER_IS_BETTER
from .events import finite, of_type, read_events, read_status
from .methods import spec

COLUMNS = ("run", "method", "knobs", "status", "task_metric", "task_score", "eval_loss", "trainable", "trainable_pct",
           "steps", "lr", "train_s", "eval_s", "supervised_tokens", "tokens_per_s", "peak_mem_mb", "adapter_mb",
           "can_merge")
# Which way is better per column: "max", "min", or "score" (the task metric's own direction). Columns not here
# (names, counts that are the same by design) are not ranked.
BETTER = {"task_score": "score", "eval_loss": "min", "trainable": "min", "trainable_pct": "min", "train_s": "min",
          "tokens_per_s": "max", "peak_mem_mb": "min", "adapter_mb": "min", "can_merge": "max"}


def _config(run_dir: Path) -> dict[str, Any]:
    from .config import RunConfig

    try:
        return RunConfig.load(run_dir / "config.yaml").to_dict()
    except (OSError, ValueError):
        return {}


def dir_size(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (0 when it is missing)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def row(run_dir: str | Path, label: str | None = None, knob: str | None = None) -> dict[str, Any]:
    """The leaderboard row of one run folder; ``knob`` names the swept knob whose value goes in "knobs"."""
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    cfg = _config(run_dir)
    method = cfg.get("method") or ""
    mc = cfg.get("method_config") or {}
    start = next(iter(of_type(events, "start")), {})
    steps = of_type(events, "step")
    last = steps[-1] if steps else {}
    full = next((e for e in reversed(of_type(events, "eval")) if "task_metric" in e), {})
    ends = of_type(events, "end")
    status = ends[-1].get("status") if ends else (read_status(run_dir).get("status") or "queued")
    trainable, total = start.get("trainable"), start.get("total_params")
    train_s = finite(last.get("elapsed_s"))
    tokens = last.get("supervised_tokens")
    adapter = run_dir / "adapter"
    return {
        "run": label or run_dir.name,
        "method": method,
        "knobs": f"{knob}={mc.get(knob)}" if knob and knob in mc else "",
        "status": status,
        "task_metric": full.get("task_metric"),
        "task_score": finite(full.get("task_score")),
        "eval_loss": finite(full.get("eval_loss")),
        "trainable": trainable,
        "trainable_pct": round(100 * trainable / total, 4) if trainable is not None and total else None,
        "steps": last.get("step"),
        "lr": (cfg.get("train") or {}).get("lr"),
        "train_s": train_s,
        "eval_s": finite(full.get("eval_s")),
        "supervised_tokens": tokens,
        "tokens_per_s": round(tokens / train_s, 1) if isinstance(tokens, int) and train_s else None,
        "peak_mem_mb": finite(last.get("peak_mem_mb")),
        "adapter_mb": round(dir_size(adapter) / 2**20, 3) if adapter.is_dir() else None,
        "can_merge": spec(method).can_merge if method else None,
    }


def leaderboard(run_dirs: list[Path], knob: str | None = None, labels: list[str] | None = None) -> list[dict[str, Any]]:
    return [row(d, (labels or [None] * len(run_dirs))[i], knob) for i, d in enumerate(run_dirs)]


def _direction(column: str, rows: list[dict[str, Any]]) -> str:
    way = BETTER[column]
    if way != "score":
        return way
    metric = next((r["task_metric"] for r in rows if r.get("task_metric")), None)
    return "max" if HIGHER_IS_BETTER.get(metric or "", True) else "min"


def best_values(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{column: the best value in it} over the ranked columns that have at least two values (a column whose rows
    all hold the same value has no best)."""
    out = {}
    for col in BETTER:
        values = [r[col] for r in rows if r.get(col) is not None]
        if len(values) < 2 or len(set(values)) < 2:
            continue
        out[col] = max(values) if _direction(col, rows) == "max" else min(values)
    return out


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows best first: by task score (its direction), then eval loss; rows without a score last."""
    sign = 1 if _direction("task_score", rows) == "max" else -1

    def key(r: dict[str, Any]) -> tuple:
        score, loss = r.get("task_score"), r.get("eval_loss")
        return (score is None, -sign * (score or 0.0), loss if loss is not None else float("inf"))

    return sorted(rows, key=key)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # one per writer
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    tmp.replace(path)
    return path


def train_examples(run_dir: str | Path) -> int | None:
    """Training rows of a run (its start event), the data size the advisor is asked about."""
    start = next(iter(of_type(read_events(run_dir), "start")), {})
    n = start.get("train_examples")
    return n if isinstance(n, int) else None


def verdict(rows: list[dict[str, Any]], rows_trained: int, hardware: str, goal: str) -> dict[str, Any]:
    """The advisor's recommendation (core.advisor) for this data size, hardware and goal, and whether the
    measurement agreed: the best measured run's method is the recommended one. {"recommended", "label",
    "best", "best_run", "agreed" (None before any run has a score), "text"}."""
    from .advisor import GOALS, HARDWARE, recommend

    advice = recommend(rows_trained, hardware, goal)  # type: ignore[arg-type]
    scored = [r for r in ranked(rows) if r.get("task_score") is not None]
    swept = {r["method"] for r in rows}
    head = (f"Advisor ({rows_trained:,} training rows, {HARDWARE[hardware]}, goal: {GOALS[goal]}): "
            f"{advice.label} ({advice.method}).")
    if not scored:
        return {"recommended": advice.method, "label": advice.label, "best": None, "best_run": None,
                "agreed": None, "text": f"{head} No run has a task score yet."}
    best = scored[0]
    by = f"{best['task_metric']} ({best['task_score']:.4f})"
    tied = sum(r["task_score"] == best["task_score"] for r in scored)
    if tied > 1:
        by += f", tied with {tied - 1} other run{'s' if tied > 2 else ''} and ahead on eval loss"
    agreed = best["method"] == advice.method
    if agreed:
        tail = f"The measurement agrees: {best['run']} is best by {by}."
    elif advice.method not in swept:
        tail = f"The sweep did not include {advice.method}; the best measured is {best['run']}, by {by}."
    else:
        tail = f"The measurement disagrees: {best['run']} is best by {by}, not {advice.method}."
    return {"recommended": advice.method, "label": advice.label, "best": best["method"], "best_run": best["run"],
            "agreed": agreed, "text": f"{head} {tail}"}
