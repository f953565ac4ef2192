"""On-demand evaluation of finished runs (the Runs tab's Evaluate button), in the background.

Each request starts ``python -m core eval --run RUN --json`` as a worker process (the model stays out of the
server's memory, a crash stays in the worker) and a thread that waits for it; the server never blocks. When it
ends well, the registry gets the new numbers from metrics.jsonl (core.events.summarize, as after training).
One evaluation per run at a time; ``state(run_id)`` says how it stands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cores import CoreShare
from .jobs import PROJECT_ROOT, registry_numbers
from .store import RunStore

EvalCommand = Callable[[Path], list[str]]
TIMEOUT_S = 3600


def eval_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "core", "eval", "--run", str(run_dir), "--json"]


@dataclass
class EvalState:
    status: str  # "running" | "done" | "failed"
    started: float
    message: str = ""
    event: dict[str, Any] | None = None  # the eval event, when done


class Evaluations:
    def __init__(self, command: EvalCommand = eval_command, env: dict[str, str] | None = None,
                 cores: CoreShare | None = None):
        self.command = command
        self.env = env
        self.cores = cores or CoreShare()
        self._states: dict[str, EvalState] = {}
        self._lock = threading.Lock()

    def start(self, store: RunStore, run_id: str) -> EvalState:
        """Evaluate a finished run with an adapter in the background. ValueError when it cannot start."""
        run = store.require(run_id)
        if run.active:
            raise ValueError(f"{run.name} is {run.status}; evaluate it when it has finished.")
        if not run.has_adapter:
            raise ValueError(f"{run.name} has no saved adapter to evaluate.")
        with self._lock:
            current = self._states.get(run_id)
            if current is not None and current.status == "running":
                raise ValueError(f"{run.name} is already being evaluated.")
            state = self._states[run_id] = EvalState("running", time.time())
        threading.Thread(target=self._work, args=(store, run_id, run.dir, state), daemon=True,
                         name=f"eval-{run_id}").start()
        return state

    def state(self, run_id: str) -> EvalState | None:
        with self._lock:
            return self._states.get(run_id)

    def wait(self, run_id: str, timeout: float) -> EvalState | None:
        """The state once it is no longer running, or after ``timeout`` seconds."""
        end = time.time() + timeout
        while time.time() < end:
            state = self.state(run_id)
            if state is None or state.status != "running":
                return state
            time.sleep(0.2)
        return self.state(run_id)

    def _work(self, store: RunStore, run_id: str, run_dir: Path, state: EvalState) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        try:
            with self.cores.held(f"eval:{run_id}") as threads:
                env["OMP_NUM_THREADS"] = str(threads)
                p = subprocess.run(self.command(run_dir), cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=TIMEOUT_S)
            if p.returncode != 0:
                lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
                why = lines[-1].removeprefix("error: ") if lines else f"exit code {p.returncode}"
                state.status, state.message = "failed", why[:400]
                return
            state.event = json.loads(p.stdout)
            if store.get(run_id) is not None:  # not deleted meanwhile
                store.update(run_id, **registry_numbers(run_dir))
            state.status = "done"
        except Exception as e:  # noqa: BLE001 - a thread must not die silently: the state says what happened
            state.status, state.message = "failed", f"{type(e).__name__}: {e}"[:400]


__all__ = ["EvalState", "Evaluations", "eval_command"]
