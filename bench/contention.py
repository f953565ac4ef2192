"""How much chat in the studio slows a training run on the same CPU: with the studio's split of the cores
(studio.cores.CoreShare) and without it (both sides with every core, as before).

A real worker (``python -m core train``: the default model, LoRA on the identity sample, log_every 1) runs in its
own process, started the way the studio's queue starts it. This process serves chat through the studio's own path
(studio.chat.ChatService: the base model, greedy, replies back to back) in three phases of PHASE_S seconds:

    alone    no chat: the step time of training on its own
    shared   chat replies while CoreShare splits the cores (the studio's policy)
    naive    chat replies with every core, the worker keeping every core too

A phase's step time is the worker's own clock (``elapsed_s`` of its step events) over the whole steps inside the
phase. ``python -m bench.contention [--quick]`` prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Tell me about the history of Rome, in detail."}]


def steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("type") == "step"]


def phase(run_dir: Path, seconds: float, chat=None) -> dict:
    """Run one phase; the worker's mean step time over the steps that began and ended inside it."""
    from core.generate import GenerationSettings
    from studio.chat import Column

    first = len(steps(run_dir))
    end, rates = time.time() + seconds, []
    settings = GenerationSettings(max_new_tokens=48, temperature=0.0)
    while time.time() < end:
        if chat is None:
            time.sleep(0.2)
            continue
        last = None
        for last in chat.reply("default", [Column("base", "base", None)], [PROMPT], settings):
            pass
        if last is not None and (m := re.search(r"([\d.]+) tok/s", last.stats)):
            rates.append(float(m.group(1)))
    done = steps(run_dir)[first:]  # step `first` began before the phase did: it is the reference point only
    if len(done) < 2:
        raise RuntimeError(f"only {len(done)} steps in a {seconds:.0f} s phase: make the phase longer")
    step_s = (done[-1]["elapsed_s"] - done[0]["elapsed_s"]) / (len(done) - 1)
    return {"steps": len(done) - 1, "step_s": step_s,
            "chat_tokens_per_s": sum(rates) / len(rates) if rates else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    phase_s = 40.0 if args.quick else 90.0
    from core.generate import GenerationSettings
    from core.threads import usable_cores
    from studio.chat import ChatService, Column
    from studio.cores import CoreShare

    cores = usable_cores()
    share = CoreShare(cores)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        shared_chat, naive_chat = ChatService(share), ChatService(CoreShare(cores))  # naive: a split of its own
        for chat in (shared_chat, naive_chat):  # load the model and warm up before the worker starts
            list(chat.reply("default", [Column("base", "base", None)], [PROMPT], GenerationSettings(max_new_tokens=4)))
        env = dict(os.environ, OMP_NUM_THREADS=str(share.join("run", run_dir)), PYTHONPATH=str(ROOT))
        worker = subprocess.Popen(
            [sys.executable, "-m", "core", "train", "--data", str(ROOT / "assets" / "identity_sample.json"),
             "--method", "lora", "--max-steps", "100000", "--log-every", "1", "--out", str(run_dir)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.time() + 300
            while len(steps(run_dir)) < 3:
                if worker.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the worker did not start training: {worker.stderr.read()[-800:]}")
                time.sleep(0.5)
            alone = phase(run_dir, phase_s)
            shared = phase(run_dir, phase_s, shared_chat)
            naive = phase(run_dir, phase_s, naive_chat)
        finally:
            (run_dir / "STOP").write_text("")
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
    result = {
        "cores": cores, "phase_s": phase_s, "alone": alone, "shared": shared, "naive": naive,
        "slowdown_shared_pct": 100 * (shared["step_s"] / alone["step_s"] - 1),
        "slowdown_naive_pct": 100 * (naive["step_s"] / alone["step_s"] - 1),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
