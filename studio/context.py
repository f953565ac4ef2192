"""The studio's shared, server-side services, built once and passed to every tab builder.

Nothing here is per-browser-session: the run registry, the job queue, caches of tokenizers and model configs,
and the chat model are shared by every session. Per-session form state lives in gr.State (see studio/ui.py).
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from core.config import DEFAULT_MODEL

from .chat import ChatService
from .cores import CoreShare
from .estimate import Estimator
from .evaluations import Evaluations
from .jobs import CommandFn, JobQueue
from .metrics import MetricsCache
from .paths import inside
from .store import RunStore

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_UPLOAD_LIMIT = 200 * 1024 * 1024


class TokenizerCache:
    """One tokenizer per model name, loaded on first use."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, model: str):
        from core.models import load_tokenizer

        with self._lock:
            if model not in self._tokenizers:
                self._tokenizers[model] = load_tokenizer(model)
            return self._tokenizers[model]


@dataclass
class StudioContext:
    data_dir: Path
    store: RunStore
    jobs: JobQueue
    default_model: str = DEFAULT_MODEL
    max_upload_bytes: int = DEFAULT_UPLOAD_LIMIT
    metrics: MetricsCache = field(default_factory=MetricsCache)
    estimator: Estimator = field(default_factory=Estimator)
    tokenizers: TokenizerCache = field(default_factory=TokenizerCache)
    chat: ChatService = field(default_factory=ChatService)
    evaluations: Evaluations = field(default_factory=Evaluations)  # the Runs tab's Evaluate, in the background
    cores: CoreShare = field(default_factory=CoreShare)  # one split of the CPU between jobs, evaluations and chat
    assets_dir: Path = ASSETS

    @classmethod
    def create(
        cls,
        data_dir: str | Path,
        *,
        default_model: str = DEFAULT_MODEL,
        max_upload_bytes: int = DEFAULT_UPLOAD_LIMIT,
        slots: list[str] | None = None,
        command: CommandFn | None = None,
        start_jobs: bool = True,
    ) -> StudioContext:
        store = RunStore(data_dir)
        cores = CoreShare()
        jobs = JobQueue(store, slots=slots, command=command, cores=cores)
        if start_jobs:
            jobs.start()  # re-attaches to surviving workers, marks dead ones interrupted
        ctx = cls(store.data_dir, store, jobs, default_model=default_model, max_upload_bytes=max_upload_bytes,
                  chat=ChatService(cores), evaluations=Evaluations(cores=cores), cores=cores)
        ctx.uploads_dir.mkdir(exist_ok=True)
        ctx.exports_dir.mkdir(exist_ok=True)
        return ctx

    @functools.cached_property
    def browser_secret(self) -> str:
        """The key the page's browser-kept values (gr.BrowserState) are encrypted with, made once per data folder
        and kept in it, so what a browser remembers still opens after the studio restarts."""
        path = inside(self.data_dir, "browser_secret")
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            part = path.with_name(f".{path.name}.{os.getpid()}.part")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secrets.token_urlsafe(24))
            try:
                os.link(part, path)  # whole or not at all; two studios starting at once: the first key stands
            except FileExistsError:
                if not path.read_text(encoding="utf-8").strip():  # an empty key left by an older version
                    os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)
        return path.read_text(encoding="utf-8").strip()

    @property
    def uploads_dir(self) -> Path:
        return inside(self.data_dir, "uploads")

    @property
    def exports_dir(self) -> Path:
        return inside(self.data_dir, "exports")

    def samples(self) -> dict[str, Path]:
        """Bundled sample datasets by file name."""
        return {p.name: p for p in sorted(self.assets_dir.glob("*.json*")) if p.suffix in (".json", ".jsonl")}

    def close(self) -> None:
        self.jobs.shutdown()
