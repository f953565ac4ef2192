"""Run registry: one SQLite file in the data folder, one folder per run under ``DATA/runs/<id>/``.

    DATA/
      studio.sqlite3          this registry
      runs/<id>/              config.yaml, metrics.jsonl, status.json, train.log, checkpoints/, adapter/
      uploads/                uploaded datasets, stored under generated names
      exports/                zips and merged model folders

Statuses: ``queued`` -> ``running`` -> ``completed`` | ``stopped`` | ``failed`` | ``interrupted``.
A run is *active* while queued or running. Finished runs (any other status) can be resumed, renamed, deleted.
Every method takes the run id, which is validated (see studio.paths), so no call can reach outside DATA/runs.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.events import END_STATUSES, pid_alive

from .paths import UnsafePathError, check_run_id, clean_name, inside, new_run_id

ACTIVE = ("queued", "running")
FINISHED = END_STATUSES
STATUSES = ACTIVE + FINISHED

_COLUMNS = {
    "name": str, "model": str, "method": str, "status": str, "reason": str, "pid": int, "device": str,
    "created": float, "started": float, "finished": float, "trainable": int, "total_params": int,
    "final_loss": float, "final_eval_loss": float, "steps": int, "total_steps": int, "resume": int, "queued_at": float,
    "eval_metrics": dict, "sweep": str,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    method TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    device TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    trainable INTEGER,
    total_params INTEGER,
    final_loss REAL,
    final_eval_loss REAL,
    steps INTEGER,
    total_steps INTEGER,
    resume INTEGER NOT NULL DEFAULT 0,
    queued_at REAL,
    config TEXT NOT NULL DEFAULT '{}',
    eval_metrics TEXT,
    sweep TEXT
)
"""
# An experiment (core.sweep): several runs queued together on one dataset with the same split, seed and steps.
# ``record`` is core.sweep.sweep_record's JSON; its runs are the rows of ``runs`` whose ``sweep`` is its id.
_SWEEPS = """
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL DEFAULT '{}'
)
"""
# API tokens (studio.tokens): only the sha256 of each secret is kept. ``revoked`` is when it was revoked (NULL: valid).
_TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL,
    revoked REAL
)
"""
# Tables added after the first release, created in an older registry when it is opened.
_TABLES = (_SWEEPS, _TOKENS_SCHEMA)
# Columns added after the first release, added to an older registry when it is opened: {name: SQL type}.
_MIGRATIONS = {"eval_metrics": "TEXT", "sweep": "TEXT"}


@dataclass
class Run:
    id: str
    name: str
    model: str
    method: str
    status: str
    reason: str
    pid: int | None
    device: str
    created: float
    started: float | None
    finished: float | None
    trainable: int | None
    total_params: int | None
    final_loss: float | None
    final_eval_loss: float | None
    steps: int | None
    total_steps: int | None
    resume: int
    queued_at: float | None
    config: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # core.events.summarize's: the last full eval
    sweep: str | None = None  # the id of the experiment that queued it (table sweeps), if any
    dir: Path = Path()

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def duration_s(self) -> float | None:
        if not self.started:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file() or (self.adapter_dir / "config.json").is_file()

    def method_config(self) -> dict[str, Any]:
        return dict(self.config.get("method_config") or {})


class RunStore:
    """Thread-safe registry. One short-lived connection per call; WAL so readers never block the writer."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.runs_root = self.data_dir / "runs"
        self.runs_root.mkdir(exist_ok=True)
        if self.runs_root.is_symlink():
            raise UnsafePathError(f"{self.runs_root} is a symbolic link; refusing to use it")
        self.db_path = self.data_dir / "studio.sqlite3"
        self._lock = threading.RLock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            for table in _TABLES:
                db.execute(table)
            have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
            for name, sql_type in _MIGRATIONS.items():
                if name not in have:  # a registry from before this column: add it, rows read it as empty
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            db = self._connect()
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()

    # ---- paths ---------------------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return inside(self.runs_root, check_run_id(run_id))

    # ---- create / read -------------------------------------------------------------------------------------

    def create(self, config: RunConfig, name: str | None = None, status: str = "queued") -> Run:
        """Register a run, make its folder and write ``config.yaml`` (with the run's display name)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: choose one of {', '.join(STATUSES)}")
        name = clean_name(name or config.name or f"{config.method_name} run")
        config.name = name
        with self._lock:
            now = time.time()
            run_id = new_run_id(now)
            while self.runs_root.joinpath(run_id).exists():
                run_id = new_run_id()
            folder = self.run_dir(run_id)
            folder.mkdir()
            config.save(folder / "config.yaml")
            self._exec(
                "INSERT INTO runs (id, name, model, method, status, created, queued_at, config) VALUES (?,?,?,?,?,?,?,?)",
                (run_id, name, config.model, config.method_name, status, now, now, json.dumps(config.to_dict())),
            )
        return self.get(run_id)  # type: ignore[return-value]

    def get(self, run_id: str) -> Run | None:
        check_run_id(run_id)
        rows = self._exec("SELECT * FROM runs WHERE id = ?", (run_id,))
        return self._to_run(rows[0]) if rows else None

    def require(self, run_id: str) -> Run:
        run = self.get(run_id)
        if run is None:
            raise KeyError(f"no run with id {run_id}")
        return run

    def list(self, status: tuple[str, ...] | None = None) -> list[Run]:
        """All runs, newest first (optionally only those with one of the given statuses)."""
        if status:
            marks = ",".join("?" * len(status))
            rows = self._exec(f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY created DESC", tuple(status))
        else:
            rows = self._exec("SELECT * FROM runs ORDER BY created DESC")
        return [self._to_run(r) for r in rows]

    def queued(self) -> list[Run]:
        """Queued runs in the order they will start (oldest request first)."""
        return [self._to_run(r) for r in self._exec("SELECT * FROM runs WHERE status = 'queued' ORDER BY queued_at, rowid")]

    def _to_run(self, row: sqlite3.Row) -> Run:
        d = dict(row)
        for key in ("config", "eval_metrics"):
            try:
                value = json.loads(d.get(key) or "{}")
            except json.JSONDecodeError:
                value = {}
            d[key] = value if isinstance(value, dict) else {}
        return Run(**d, dir=self.runs_root / d["id"])

    # ---- update --------------------------------------------------------------------------------------------

    def update(self, run_id: str, **values: Any) -> None:
        check_run_id(run_id)
        unknown = sorted(set(values) - set(_COLUMNS))
        if unknown:
            raise ValueError(f"unknown run field(s): {', '.join(unknown)}")
        if "status" in values and values["status"] not in STATUSES:
            raise ValueError(f"status {values['status']!r}: choose one of {', '.join(STATUSES)}")
        if not values:
            return
        if "eval_metrics" in values:
            values["eval_metrics"] = json.dumps(values["eval_metrics"] or {})
        sets = ", ".join(f"{k} = ?" for k in values)
        self._exec(f"UPDATE runs SET {sets} WHERE id = ?", (*values.values(), run_id))

    def set_status(self, run_id: str, status: str, reason: str = "", **values: Any) -> None:
        if status in FINISHED:
            values.setdefault("finished", time.time())
            values.setdefault("pid", None)
        self.update(run_id, status=status, reason=reason, **values)

    def requeue(self, run_id: str) -> None:
        """Put a finished run back in the queue to resume from its last checkpoint (keeps its first start time)."""
        run = self.require(run_id)
        if run.active:
            raise ValueError(f"run '{run.name}' is {run.status}; only a finished run can be resumed")
        self.update(run_id, status="queued", reason="", resume=1, finished=None, pid=None, queued_at=time.time())

    def rename(self, run_id: str, name: str) -> str:
        name = clean_name(name)
        self.require(run_id)
        self.update(run_id, name=name)
        return name

    def delete(self, run_id: str) -> None:
        """Remove the run and its folder. Active runs must be stopped first."""
        run = self.require(run_id)
        if run.active:
            raise ValueError(f"run '{run.name}' is {run.status}; stop it before deleting it")
        folder = self.run_dir(run_id)
        if folder.is_symlink():  # never follow a planted link into someone else's files
            folder.unlink()
        elif folder.exists():
            shutil.rmtree(folder)
        self._exec("DELETE FROM runs WHERE id = ?", (run_id,))

    # ---- experiments (sweeps) ------------------------------------------------------------------------------

    def create_sweep(self, name: str, record: dict[str, Any], run_ids: list[str]) -> str:
        """Register an experiment and link its (already created) runs to it; returns its id."""
        for run_id in run_ids:
            self.require(run_id)
        with self._lock:
            sweep_id = new_run_id()
            self._exec("INSERT INTO sweeps (id, name, created, record) VALUES (?,?,?,?)",
                       (sweep_id, clean_name(name), time.time(), json.dumps(record)))
            for run_id in run_ids:
                self.update(run_id, sweep=sweep_id)
        return sweep_id

    def sweep(self, sweep_id: str) -> dict[str, Any] | None:
        """{"id", "name", "created", "record", "runs": [Run, in the order they were queued]}, or None."""
        check_run_id(sweep_id)
        rows = self._exec("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        if not rows:
            return None
        d = dict(rows[0])
        try:
            d["record"] = json.loads(d["record"] or "{}")
        except json.JSONDecodeError:
            d["record"] = {}
        runs = self._exec("SELECT * FROM runs WHERE sweep = ? ORDER BY queued_at, rowid", (sweep_id,))
        d["runs"] = [self._to_run(r) for r in runs]
        return d

    def sweeps(self) -> list[dict[str, Any]]:
        """Every experiment, newest first: {"id", "name", "created"}."""
        return [dict(r) for r in self._exec("SELECT id, name, created FROM sweeps ORDER BY created DESC")]

    # ---- API tokens (the logic is studio.tokens') ---------------------------------------------------------

    def add_token(self, token_id: str, name: str, digest: str) -> None:
        self._exec("INSERT INTO api_tokens (id, name, hash, created) VALUES (?,?,?,?)",
                   (token_id, name, digest, time.time()))

    def token(self, token_id: str) -> dict[str, Any] | None:
        rows = self._exec("SELECT * FROM api_tokens WHERE id = ?", (token_id,))
        return dict(rows[0]) if rows else None

    def tokens(self) -> list[dict[str, Any]]:
        """Every token (valid and revoked), newest first, without the hashes."""
        rows = self._exec("SELECT id, name, created, last_used, revoked FROM api_tokens "
                          "ORDER BY created DESC, rowid DESC")
        return [dict(r) for r in rows]

    def update_token(self, token_id: str, *, last_used: float | None = None, revoked: float | None = None) -> None:
        values = {k: v for k, v in (("last_used", last_used), ("revoked", revoked)) if v is not None}
        if values:
            sets = ", ".join(f"{k} = ?" for k in values)
            self._exec(f"UPDATE api_tokens SET {sets} WHERE id = ?", (*values.values(), token_id))

    # ---- startup -------------------------------------------------------------------------------------------

    def mark_orphans(self, alive: Callable[[Run], bool] | None = None) -> list[str]:
        """Mark every run still 'running' whose worker is gone as interrupted. Returns their ids.

        ``alive(run)`` says whether the run's worker still runs (default: core.events.pid_alive of its pid)."""
        alive = alive or (lambda r: pid_alive(r.pid))
        marked = []
        for run in self.list(status=("running",)):
            if not alive(run):
                self.set_status(run.id, "interrupted", "the studio restarted and the worker was no longer running")
                marked.append(run.id)
        return marked

