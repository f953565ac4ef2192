"""Soak tests (slow, run by `make soak`, not by `make test`: the file name does not match test_*.py).

1. Three client sessions (three gradio_client.Client, each its own session, in threads) queue six short runs
   on a tiny model through the same endpoints as the UI. All six complete, one at a time, in queue order, none
   is lost, and the registry agrees with the run folders afterwards.
2. Chat stays responsive while a training job runs: time to first token with and without a job, both printed.

The app, the tiny model and the helpers come from test_studio_api (loopback only, free port, tmp data folder).
Every wait has a deadline; the whole file stops by itself within about ten minutes.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from gradio_client import Client

from test_studio_api import app, load_sample, start, tiny_model_dir, wait_status  # noqa: F401  (fixtures)

CLIENTS = 3
RUNS_PER_CLIENT = 2
SHORT = {"Max steps (optimiser steps)": 4, "Eval every (steps)": 2}
DEADLINE_S = 420  # for all six runs to finish


@pytest.mark.timeout(600)
def test_three_sessions_queue_six_runs_in_order(app, tiny_model_dir):
    ctx, url = app
    assert url.startswith("http://127.0.0.1:")
    errors: list[BaseException] = []
    submitted: list[tuple[str, str]] = []  # (client name, run id), in each client's submission order
    lock = threading.Lock()
    gate = threading.Barrier(CLIENTS, timeout=120)

    def session(k: int) -> None:
        try:
            client = Client(url, verbose=False)  # its own session: its own dataset state
            load_sample(client, tiny_model_dir)
            gate.wait()  # all three sessions submit at the same time
            for j in range(RUNS_PER_CLIENT):
                _, run_id = start(client, app, f"soak c{k} r{j}", SHORT)
                with lock:
                    submitted.append((f"c{k}", run_id))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=session, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a session hung while submitting"
    ids = [rid for _, rid in submitted]
    assert len(ids) == CLIENTS * RUNS_PER_CLIENT and len(set(ids)) == len(ids)

    watcher = Client(url, verbose=False)
    end = time.time() + DEADLINE_S
    max_running = 0
    while time.time() < end:
        runs = {r.id: r for r in ctx.store.list()}
        max_running = max(max_running, sum(runs[i].status == "running" for i in ids))
        if all(runs[i].status not in ("queued", "running") for i in ids):
            break
        time.sleep(1)
    else:
        pytest.fail(f"runs not finished after {DEADLINE_S}s: {[(i, ctx.store.get(i).status) for i in ids]}")
    assert max_running <= 1

    for rid in ids:  # the UI's own status endpoint agrees
        st = watcher.predict(rid, api_name="/run_status")
        assert st["status"] == "completed" and st["step"] == 4 and st["position"] is None, st

    # one at a time, in queue order: sorted by queue time, each starts after the previous one finished
    runs = sorted((ctx.store.get(i) for i in ids), key=lambda r: (r.queued_at, r.created))
    for prev, nxt in zip(runs, runs[1:]):
        assert prev.started is not None and prev.finished is not None and nxt.started is not None
        assert prev.started <= prev.finished <= nxt.started, (prev.name, nxt.name)
    # each session's own runs kept their order
    for c in {c for c, _ in submitted}:
        mine = [ctx.store.get(rid) for cc, rid in submitted if cc == c]
        assert mine[0].started < mine[1].started

    # the registry and the run folders agree, nothing lost, adapters present
    rows = {r.id: r for r in ctx.store.list()}
    folders = {p.name for p in ctx.store.runs_root.iterdir() if p.is_dir()}
    assert set(rows) == folders
    for r in rows.values():
        assert r.status == "completed", (r.name, r.status, r.reason)
        assert (r.dir / "adapter" / "adapter_model.safetensors").is_file(), r.name
        assert (r.dir / "adapter" / "adapter_config.json").is_file(), r.name
        assert json.loads((r.dir / "status.json").read_text())["status"] == "completed"
        assert r.steps == 4 and r.final_loss is not None
    order = " -> ".join(f"{r.name} [{r.started - runs[0].started:.1f}s..{r.finished - runs[0].started:.1f}s]"
                        for r in runs)
    print(f"\nsoak: {len(runs)} runs, one at a time, in queue order: {order}")


def time_to_first_token(client: Client, model: str, timeout: float = 60.0) -> tuple[float, str]:
    """Client-side seconds from submitting /chat_reply to the first streamed frame with the assistant's message
    (the server yields it on the first generated token), and the server's own latency line. Asserts the whole
    answer arrives."""
    client.predict(api_name="/chat_clear")
    client.predict("Who are you?", [], True, model, api_name="/chat_send")
    t0 = time.perf_counter()
    job = client.submit(0.0, 0.9, 16, "", "unmerged", api_name="/chat_reply")
    first = None
    end = time.time() + timeout
    while first is None and time.time() < end:
        for frame in job.outputs():
            bot = frame[0] if frame else None
            if isinstance(bot, list) and bot and bot[-1].get("role") == "assistant":
                first = time.perf_counter() - t0
                break
        if first is None:
            if job.done():
                break
            time.sleep(0.02)
    out = job.result(timeout=max(1.0, end - time.time()))
    assert out[0][-1]["role"] == "assistant", out[0]
    assert first is not None, ("no streamed frame carried the answer", len(job.outputs()), out[0][-1])
    assert first < timeout
    return first, out[5]


@pytest.mark.timeout(420)
def test_chat_time_to_first_token_with_and_without_a_job(app, tiny_model_dir):
    ctx, url = app
    client = Client(url, verbose=False)
    time_to_first_token(client, tiny_model_dir)  # warm-up: loads the base model once
    assert not ctx.jobs.running()
    idle, idle_server = time_to_first_token(client, tiny_model_dir)

    trainer = Client(url, verbose=False)
    load_sample(trainer, tiny_model_dir)
    _, run_id = start(trainer, app, "soak busy", {"Max steps (optimiser steps)": 5000})
    try:
        end = time.time() + 180
        while time.time() < end:  # wait until the worker is really training (past model loading)
            st = trainer.predict(run_id, api_name="/run_status")
            if st["status"] == "running" and st["step"]:
                break
            assert st["status"] in ("queued", "running"), st
            time.sleep(1)
        else:
            pytest.fail(f"the training run never took a step: {st}")
        busy, busy_server = time_to_first_token(client, tiny_model_dir)
        assert ctx.store.get(run_id).status == "running"  # it really overlapped the chat
    finally:
        trainer.predict(run_id, api_name="/stop_run")
        assert wait_status(trainer, run_id, timeout=120)["status"] == "stopped"
    print(f"\nTTFT idle: {idle * 1000:.0f} ms (server: {idle_server})"
          f"\nTTFT while training: {busy * 1000:.0f} ms (server: {busy_server})")
