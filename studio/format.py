"""Small formatting helpers shared by the tabs: numbers, durations, sizes, run labels, safe HTML."""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from core.events import duration

from .i18n import t
from .messages import localize
from .store import Run

log = logging.getLogger("studio")
__all__ = ["log", "duration", "count", "size", "folder_size", "loss", "run_label", "knobs_text", "esc", "user_error",
           "task_score", "eval_text"]


def count(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def size(n: int | None) -> str:
    if not n:
        return "—"
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def folder_size(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    except OSError:
        return 0


def loss(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


EVAL_SHORT = {"exact_match": "EM", "contains": "contains", "token_f1": "F1", "rouge_l": "ROUGE-L",
              "accuracy": "accuracy", "macro_f1": "macro-F1", "token_accuracy": "tok acc", "perplexity": "ppl"}


def task_score(metrics: dict | None) -> str:
    """'ROUGE-L 0.812' — the headline metric of a run's last full evaluation; '—' before any."""
    m = metrics or {}
    name, value = m.get("task_metric"), m.get("task_score")
    if not name or not isinstance(value, (int, float)):
        return "—"
    return f"{EVAL_SHORT.get(name, name.replace('_', ' '))} {value:.3f}"


def eval_text(metrics: dict | None) -> str:
    """'EM 0.50 · contains 0.92 · F1 0.85 · tok acc 0.93 · ppl 1.10': the other metrics, compactly."""
    m = metrics or {}
    parts = [f"{short} {m[k]:.2f}" for k, short in EVAL_SHORT.items()
             if k != m.get("task_metric") and isinstance(m.get(k), (int, float))]
    return " · ".join(parts) or "—"


def run_label(run: Run) -> str:
    return f"{run.name} · {run.method} · {run.id[-6:]}"


def knobs_text(run: Run) -> str:
    """'lora r=8 alpha=16 targets=q_proj,v_proj' — the run's method and its knobs, for chat column labels."""
    parts = []
    for k, v in run.method_config().items():
        if isinstance(v, list):
            v = ",".join(map(str, v))
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    decay = (run.config.get("train") or {}).get("llrd_decay", 1.0)
    if decay and decay < 1:  # LLRD applies to any method whose parameters sit in blocks
        parts.append(f"llrd_decay={decay:g}")
    return f"{run.method} " + " ".join(parts[:5])


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def user_error(fn: Callable) -> Callable:
    """Turn any exception of a handler into a one-line gr.Error in the user's language (studio.messages); the
    traceback goes to the server log only."""

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, (ValueError, KeyError, OSError)):
            return gr.Error(localize(_one_line(e)))
        log.exception("handler %s failed", fn.__name__)
        return gr.Error(t("err.unexpected", kind=type(e).__name__, detail=localize(_one_line(e))))

    if inspect.isgeneratorfunction(fn):  # gradio streams generator functions: keep it one

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None

    return wrapper


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    if isinstance(e, KeyError):
        msg = msg.strip("'\"")
    return msg[:400]
