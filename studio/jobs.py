"""Job queue: every run is a worker subprocess, one per device slot at a time, the rest wait in line.

    worker:   python -m core train --config RUN/config.yaml --out RUN [--resume]
              (torchrun --nproc_per_node N -m core train ... when the slot spans several GPUs)
    stop:     write RUN/STOP (the worker finishes its step and saves), SIGTERM after ``stop_grace_s``,
              SIGKILL after another ``kill_grace_s``
    outcome:  the worker's status.json when it wrote a final one; otherwise the exit code or signal decides
              (a signal we did not send -> interrupted, a non-zero exit -> failed), with the log's last line

Workers run in their own session, so they survive a studio restart; ``start()`` re-attaches to those still
alive and marks the rest interrupted. The monitor thread never lets an exception escape: whatever a worker
does, the server keeps running. Queue order and statuses live in the run store, so nothing is lost on restart.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from core.config import RunConfig
from core.events import pid_alive, read_events, read_status, recover_status, summarize

from .cores import CoreShare
from .metrics import log_tail, tail_lines
from .store import Run, RunStore

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CommandFn = Callable[[Path, bool], list[str]]


def default_slots() -> list[str]:
    """One slot per training device: the CPU, the GPU, or all GPUs together (DDP under torchrun)."""
    try:
        from core.models import gpu_count  # torch and transformers: only when the queue starts

        n = gpu_count()
    except Exception:  # noqa: BLE001
        n = 0
    if n == 0:
        return ["cpu"]
    return ["cuda" if n == 1 else f"cuda x{n}"]


def worker_command(run_dir: Path, resume: bool, gpus: int = 0) -> list[str]:
    args = ["-m", "core", "train", "--config", str(run_dir / "config.yaml"), "--out", str(run_dir)]
    if resume:
        args.append("--resume")
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *args]
    return [sys.executable, *args]


@dataclass
class Worker:
    run_id: str
    slot: str
    pid: int
    popen: subprocess.Popen | None  # None when re-attached after a restart (not our child)
    log_file: IO[bytes] | None = None
    stop_at: float | None = None
    term_at: float | None = None
    killed_by_us: bool = False

    def returncode(self) -> int | None:
        """None while alive. For a re-attached worker the code is unknown once it ends: report -1000."""
        if self.popen is not None:
            return self.popen.poll()
        return None if pid_alive(self.pid) else -1000


class JobQueue:
    def __init__(
        self,
        store: RunStore,
        slots: list[str] | None = None,
        command: CommandFn | None = None,
        poll_s: float = 0.5,
        stop_grace_s: float = 30.0,
        kill_grace_s: float = 30.0,
        env: dict[str, str] | None = None,
        cores: CoreShare | None = None,
    ):
        self.store = store
        self.cores = cores or CoreShare()
        self.slots = slots or default_slots()
        gpus = int(self.slots[0].split("x")[-1]) if self.slots[0].startswith("cuda x") else 0
        self.command: CommandFn = command or (lambda run_dir, resume: worker_command(run_dir, resume, gpus))
        self.poll_s = poll_s
        self.stop_grace_s = stop_grace_s
        self.kill_grace_s = kill_grace_s
        self.env = env
        self.workers: dict[str, Worker] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self, monitor: bool = True) -> JobQueue:
        """Re-attach to surviving workers, then (optionally) start the monitor thread."""
        self.reattach()
        if monitor and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peft-studio-jobs", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop watching. Workers keep running and are re-attached by the next studio."""
        self._halt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            for w in self.workers.values():
                if w.log_file:
                    w.log_file.close()

    def _loop(self) -> None:
        while not self._halt.is_set():
            self.tick()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    # ---- requests ------------------------------------------------------------------------------------------

    def submit(self, config: RunConfig, name: str | None = None) -> Run:
        """Register a run and queue it. Returns the run (status 'queued'; it may start at the next tick)."""
        run = self.store.create(config, name=name)
        self._wake.set()
        return run

    def resume(self, run_id: str) -> None:
        self.store.requeue(run_id)
        self._wake.set()

    def stop(self, run_id: str) -> str:
        """Ask a run to stop. Returns what happened, as a sentence for the user."""
        with self._lock:
            run = self.store.require(run_id)
            if run.status == "queued":
                self.store.set_status(run_id, "stopped", "cancelled before it started")
                return f"'{run.name}' was removed from the queue."
            w = self.workers.get(run_id)
            if run.status != "running" or w is None:
                return f"'{run.name}' is not running ({run.status})."
            if w.stop_at is None:
                w.stop_at = time.time()
                try:
                    (run.dir / "STOP").write_text("stop requested by the studio\n", encoding="utf-8")
                except OSError as e:  # the worker can still be stopped by a signal
                    log.warning("could not write STOP for %s: %s", run_id, e)
            self._wake.set()
            return f"Stopping '{run.name}': it finishes its current step and saves."

    def position(self, run_id: str) -> int | None:
        """1-based place in the queue, or None when the run is not waiting."""
        ids = [r.id for r in self.store.queued()]
        return ids.index(run_id) + 1 if run_id in ids else None

    def running(self) -> list[str]:
        with self._lock:
            return list(self.workers)

    # ---- the monitor ---------------------------------------------------------------------------------------

    def tick(self) -> None:
        """One pass: reap finished workers, escalate stops, start queued runs on free slots. Never raises."""
        with self._lock:
            for run_id, w in list(self.workers.items()):
                try:
                    self._check(run_id, w)
                except Exception:  # noqa: BLE001 - a broken run folder must not stop the queue
                    log.exception("checking worker of run %s failed", run_id)
            try:
                self._start_queued()
            except Exception:  # noqa: BLE001
                log.exception("starting a queued run failed")

    def _check(self, run_id: str, w: Worker) -> None:
        rc = w.returncode()
        if rc is None:
            self._escalate(w)
            return
        del self.workers[run_id]
        self.cores.leave(run_id)
        if w.log_file:
            w.log_file.close()
        self._finish(run_id, rc, w)

    def _escalate(self, w: Worker) -> None:
        now = time.time()
        if w.stop_at is not None and w.term_at is None and now - w.stop_at >= self.stop_grace_s:
            w.term_at = now
            self._signal(w, signal.SIGTERM)
        elif w.term_at is not None and not w.killed_by_us and now - w.term_at >= self.kill_grace_s:
            w.killed_by_us = True
            self._signal(w, signal.SIGKILL)

    @staticmethod
    def _signal(w: Worker, sig: signal.Signals) -> None:
        try:
            os.killpg(w.pid, sig)  # the worker leads its own process group (torchrun children included)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(w.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _start_queued(self) -> None:
        busy = {w.slot for w in self.workers.values()}
        free = [s for s in self.slots if s not in busy]
        if not free:
            return
        for run in self.store.queued():
            if not free:
                break
            self._launch(run, free.pop(0))

    def _launch(self, run: Run, slot: str) -> None:
        run_dir = self.store.run_dir(run.id)
        (run_dir / "STOP").unlink(missing_ok=True)
        resume = bool(run.resume)
        cmd = self.command(run_dir, resume)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        if slot.startswith("cuda") and "x" not in slot:
            env.setdefault("CUDA_VISIBLE_DEVICES", "0")
        if slot == "cpu":  # its share of the cores: THREADS for later changes, OMP_NUM_THREADS from the start
            env["OMP_NUM_THREADS"] = str(self.cores.join(run.id, run_dir))
        log_file = open(run_dir / "worker.log", "ab")
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} on {slot}\n".encode())
        log_file.flush()
        try:
            popen = subprocess.Popen(
                cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            log_file.close()
            self.cores.leave(run.id)
            self.store.set_status(run.id, "failed", f"could not start the worker: {e}")
            return
        self.workers[run.id] = Worker(run.id, slot, popen.pid, popen, log_file)
        self.store.update(
            run.id, status="running", pid=popen.pid, device=slot, reason="",
            started=run.started or time.time(), finished=None,
        )

    # ---- outcome -------------------------------------------------------------------------------------------

    def _finish(self, run_id: str, rc: int, w: Worker) -> None:
        run = self.store.get(run_id)
        if run is None:  # deleted meanwhile
            return
        if rc < 0:  # killed by a signal (or unknown): it could not record its own end
            settle(run.dir)
        status, reason = outcome(run.dir, rc, stop_requested=w.stop_at is not None)
        (run.dir / "STOP").unlink(missing_ok=True)
        self.store.set_status(run_id, status, reason, **registry_numbers(run.dir))
        log.info("run %s finished: %s %s", run_id, status, reason)

    def reattach(self) -> None:
        """After a studio restart: adopt workers that still run, settle the ones that ended meanwhile."""
        with self._lock:
            for run in self.store.list(status=("running",)):
                if run.id in self.workers:
                    continue
                if run.pid and pid_alive(run.pid) and _is_worker_of(run.pid, run.dir):
                    self.workers[run.id] = Worker(run.id, run.device or self.slots[0], run.pid, None)
                    if self.workers[run.id].slot == "cpu":
                        self.cores.join(run.id, run.dir)
                    log.info("re-attached to run %s (pid %s)", run.id, run.pid)
                    continue
                settle(run.dir)
                status, reason = outcome(run.dir, -1000, stop_requested=False)
                self.store.set_status(run.id, status, reason, **registry_numbers(run.dir))


def _is_worker_of(pid: int, run_dir: Path) -> bool:
    """True when process ``pid`` is a worker for ``run_dir`` (not an unrelated process that reused the pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return sys.platform != "linux"  # no /proc: trust the pid
    return str(run_dir).encode() in cmdline or str(run_dir / "config.yaml").encode() in cmdline


def settle(run_dir: Path) -> None:
    """A worker that died without a word leaves status.json at "running": let the engine record it as
    interrupted, with its last metrics and an end event (core.events.recover_status). Never raises."""
    try:
        recover_status(run_dir, alive=lambda pid: False)
    except Exception:  # noqa: BLE001 - the registry is still updated from the exit code
        log.exception("could not settle the status of %s", run_dir)


def outcome(run_dir: Path, rc: int, stop_requested: bool) -> tuple[str, str]:
    """(status, reason) of a worker that has ended. rc -1000 means 'unknown' (not our child)."""
    st = read_status(run_dir)
    final = st.get("status") in ("completed", "stopped", "failed")
    if final and (rc in (0, -1000) or st.get("status") == "failed"):
        return st["status"], str(st.get("reason") or "")
    last = _last_line(run_dir)
    if rc == -1000:
        return "interrupted", "the worker ended while the studio was not running" + (f"; last log line: {last}" if last else "")
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
        if stop_requested:
            return "stopped", f"stopped by the studio ({sig})"
        return "interrupted", f"the worker was killed by {sig}" + (f"; last log line: {last}" if last else "")
    if rc == 0:
        return "failed", "the worker exited without reporting a result"
    return "failed", f"the worker exited with code {rc}" + (f": {last}" if last else "")


def _last_line(run_dir: Path) -> str:
    for name in ("worker.log", "train.log"):
        lines = [ln.strip() for ln in tail_lines(run_dir / name, 30) if ln.strip() and not ln.startswith("===")]
        if lines:
            return lines[-1][:300]
    return ""


def registry_numbers(run_dir: Path) -> dict:
    """Registry columns taken from metrics.jsonl (None values are left out)."""
    s = summarize(read_events(run_dir / "metrics.jsonl"))
    keys = ("trainable", "total_params", "final_loss", "final_eval_loss", "steps", "total_steps", "eval_metrics")
    return {k: s[k] for k in keys if s.get(k) is not None}


__all__ = ["JobQueue", "log_tail", "outcome", "worker_command"]
