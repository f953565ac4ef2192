"""Chat with the base model and finished runs side by side: one base model in memory, adapters switched per
request (core.generate.AdapterBank), replies streamed one column after the other.

For methods that can merge (LoRA and the in-place ones), ``merged=True`` folds the adapter into the weights for
the request and unfolds it afterwards, so the latency of both forms can be compared.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from core.generate import AdapterBank, GenerationSettings, stream

from .cores import CoreShare
from .i18n import t
from .messages import localize

MAX_PROMPT_CHARS = 20_000


@dataclass
class Column:
    key: str  # "base" or a run id
    label: str
    adapter: Path | None  # None for the base model


@dataclass
class Reply:
    column: int
    text: str
    stats: str
    done: bool


class ChatService:
    """Shared by all sessions; requests are served one at a time (a CPU has no room for two at once)."""

    def __init__(self, cores: CoreShare | None = None) -> None:
        self.cores = cores or CoreShare()  # a reply on the CPU takes its share of the cores while it streams
        self._bank: AdapterBank | None = None
        self._model_name: str | None = None
        self._mtimes: dict[str, float] = {}
        self._lock = threading.Lock()

    def _ensure(self, model_name: str) -> AdapterBank:
        if self._bank is None or self._model_name != model_name:
            from core.models import load_model

            self._bank = None
            model, tokenizer = load_model(model_name, device="auto")
            self._bank, self._model_name, self._mtimes = AdapterBank(model, tokenizer), model_name, {}
        return self._bank

    def _ensure_adapter(self, bank: AdapterBank, col: Column) -> None:
        weights = col.adapter / "adapter_model.safetensors"  # type: ignore[operator]
        mtime = weights.stat().st_mtime if weights.exists() else 0.0
        if self._mtimes.get(col.key) != mtime or col.key not in bank.names:
            bank.add(col.key, col.adapter)  # (re)load: a resumed run rewrites its adapter
            self._mtimes[col.key] = mtime

    def reply(
        self, model_name: str, columns: list[Column], histories: list[list[dict]], settings: GenerationSettings,
        merged: bool = False,
    ) -> Iterator[Reply]:
        """Stream each column's answer to its own history (a list of {role, content}, ending with the user)."""
        with self._lock:
            bank = self._ensure(model_name)
            on_cpu = next(bank.model.parameters()).device.type == "cpu"
            replies = (r for i, (col, messages) in enumerate(zip(columns, histories))
                       for r in self._one(bank, i, col, messages, settings, merged))
            if on_cpu and self.cores.training():  # the job keeps its cores; the reply takes what they leave
                yield from in_background(replies, BACKGROUND_NICE)
                return
            with self.cores.held("chat") if on_cpu else nullcontext(0) as threads:
                if threads:
                    torch.set_num_threads(threads)
                yield from replies

    def _one(self, bank, i, col, messages, settings, merged) -> Iterator[Reply]:
        try:
            if col.adapter is not None:
                self._ensure_adapter(bank, col)
            method = bank.use(col.key if col.adapter is not None else None)
        except (ValueError, OSError, RuntimeError) as e:
            yield Reply(i, "", "⚠ " + t("chat.cannot_load", detail=localize(e)), True)
            return
        did_merge = False
        if merged and method is not None and method.can_merge:
            method.merge(bank.model)
            did_merge = True
        text, started, first, n = "", time.perf_counter(), None, 0
        out = None
        try:
            out = stream(bank.model, bank.tokenizer, method, messages, settings)
            for chunk in coalesced(out):
                if first is None:
                    first = time.perf_counter() - started
                n += 1
                text += chunk
                yield Reply(i, text, "", False)
        except ValueError as e:
            yield Reply(i, text, f"⚠ {localize(e)}", True)
            return
        finally:
            if did_merge:
                method.unmerge(bank.model)
        total = time.perf_counter() - started
        n = (out.new_tokens if out is not None and out.new_tokens else n)
        parts = [t("chat.first_token", ms=f"{1000 * (first or total):.0f}"),
                 t("chat.speed", n=f"{n / max(total, 1e-6):.1f}")]
        if method is not None and method.can_merge:
            parts.append(t("chat.merged") if did_merge else t("chat.unmerged"))
        if out is not None and out.notice:
            parts.append(localize(out.notice))
        yield Reply(i, text, " · ".join(parts), True)


BACKGROUND_NICE = 10  # a reply's niceness while a job trains on the same cores: it gets ~10% of a contended core
_END = object()


def in_background(items: Iterator, nice: int) -> Iterator:
    """``items`` produced in a thread of their own, with one torch thread and OS priority lowered by ``nice``
    (Linux: per thread), so that a training job on the same cores loses little to it. Errors are raised here;
    closing this iterator stops the producer after its current item."""
    out: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
            except (AttributeError, OSError):  # not Linux: the normal priority
                pass
            torch.set_num_threads(1)
            for item in items:
                out.put(item)
                if stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            out.put(e)
        finally:
            getattr(items, "close", lambda: None)()
            out.put(_END)

    thread = threading.Thread(target=produce, name="chat-background", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


UPDATE_EVERY_S = 0.2  # at most ~5 page updates a second


def coalesced(deltas: Iterator[str], every: float | None = None) -> Iterator[str]:
    """``deltas`` joined into pieces at most one every ``every`` seconds (UPDATE_EVERY_S), the first at once.

    Each page update costs the studio's process time (Gradio's postprocessing and diff, the event stream) that
    decoding needs too, cores and GIL: one update a token slowed decoding by ~20%. A few updates a second keep the
    text flowing and cost little. Decoding goes on in this thread between updates; closing this iterator closes
    ``deltas``, which stops decoding after its current token."""
    every = UPDATE_EVERY_S if every is None else every
    text, last = "", None
    try:
        for delta in deltas:
            text += delta
            now = time.perf_counter()
            if text and (last is None or now - last >= every):
                yield text
                text, last = "", time.perf_counter()
        if text:
            yield text
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
