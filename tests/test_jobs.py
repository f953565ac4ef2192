"""The job queue against a fake worker (a tiny script that writes metrics like core.train does)."""

import json
import os
import signal
import sys
import textwrap
import time

import pytest

from core.config import RunConfig, TrainConfig
from core.events import read_status
from core.methods.lora import LoraConfig
from studio.jobs import JobQueue, outcome, worker_command
from studio.metrics import MetricsTail, log_tail, summarize
from studio.store import RunStore

FAKE_WORKER = textwrap.dedent(
    r'''
    import json, os, signal, sys, time, yaml
    out = sys.argv[sys.argv.index("--out") + 1]
    name = yaml.safe_load(open(os.path.join(out, "config.yaml")))["name"]
    steps = 6 if "long" not in name else 400
    stop = {"flag": False}
    if "stubborn" in name:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    def status(s, step, reason=""):
        tmp = os.path.join(out, "status.json.tmp")
        json.dump({"status": s, "step": step, "total_steps": steps, "reason": reason, "pid": os.getpid()}, open(tmp, "w"))
        os.replace(tmp, os.path.join(out, "status.json"))
    m = open(os.path.join(out, "metrics.jsonl"), "a")
    def emit(**e):
        m.write(json.dumps(e) + "\n"); m.flush()
    logf = open(os.path.join(out, "train.log"), "a")
    logf.write("resumed\n" if "--resume" in sys.argv else "started\n"); logf.flush()
    emit(type="start", total_steps=steps, trainable=10, total_params=100, method="lora", device="cpu",
         num_layers=2, groups=[{"name": "all", "depth": None}])
    status("running", 0)
    for step in range(1, steps + 1):
        if "crash" in name and step == 3:
            raise RuntimeError("CUDA out of memory (fake)")
        if stop["flag"] or (os.path.exists(os.path.join(out, "STOP")) and "stubborn" not in name):
            emit(type="end", status="stopped", reason="stop requested")
            status("stopped", step - 1, "stop requested")
            sys.exit(0)
        time.sleep(0.05)
        emit(type="step", step=step, epoch=step / steps, loss=3.0 / step, lr={"all": 1e-3}, lr_by_depth={"0": 1e-3},
             grad_norm={"block 0": 0.5}, tokens_per_s=100.0, elapsed_s=step * 0.05, eta_s=(steps - step) * 0.05,
             total_steps=steps)
        status("running", step)
    emit(type="eval", step=steps, eval_loss=0.7)
    os.makedirs(os.path.join(out, "adapter"), exist_ok=True)
    emit(type="end", status="completed", reason="")
    status("completed", steps)
    '''
)


@pytest.fixture
def make_queue(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    queues = []

    def make(slots=("cpu",), store=None, **kw):
        store = store or RunStore(tmp_path / "data")
        cmd = lambda run_dir, resume: [sys.executable, str(script), "--out", str(run_dir)] + (["--resume"] if resume else [])
        q = JobQueue(store, slots=list(slots), command=cmd, poll_s=0.05, **kw)
        queues.append(q)
        return q

    yield make
    for q in queues:
        for w in list(q.workers.values()):
            if w.popen is not None and w.popen.poll() is None:
                w.popen.kill()
                w.popen.wait()
        q.shutdown()


def cfg():
    return RunConfig(method=LoraConfig(r=4), train=TrainConfig(max_steps=6))


def wait_for(pred, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def status_of(q, run_id):
    return q.store.get(run_id).status


def test_run_completes_and_registry_gets_numbers(make_queue):
    q = make_queue().start()
    run = q.submit(cfg(), name="ok")
    wait_for(lambda: status_of(q, run.id) == "completed")
    r = q.store.get(run.id)
    assert r.steps == 6 and r.total_steps == 6 and r.trainable == 10 and r.total_params == 100
    assert r.final_loss == pytest.approx(0.5) and r.final_eval_loss == pytest.approx(0.7)
    assert r.started and r.finished and r.pid is None and r.device == "cpu"


def test_one_job_per_slot_and_queue_positions(make_queue):
    q = make_queue(slots=("cpu",)).start(monitor=False)
    runs = [q.submit(cfg(), name=f"long {i}") for i in range(3)]
    q.tick()
    assert status_of(q, runs[0].id) == "running"
    assert [status_of(q, r.id) for r in runs[1:]] == ["queued", "queued"]
    assert q.position(runs[1].id) == 1 and q.position(runs[2].id) == 2 and q.position(runs[0].id) is None
    q.stop(runs[0].id)
    wait_for(lambda: (q.tick(), status_of(q, runs[0].id))[1] == "stopped")
    q.tick()
    assert status_of(q, runs[1].id) == "running" and q.position(runs[2].id) == 1
    # a queued run can be cancelled without ever starting
    assert "removed from the queue" in q.stop(runs[2].id)
    assert status_of(q, runs[2].id) == "stopped"


def test_two_slots_run_two_jobs(make_queue):
    q = make_queue(slots=("cuda:0", "cuda:1")).start(monitor=False)
    a, b, c = (q.submit(cfg(), name=f"long {i}") for i in range(3))
    q.tick()
    assert [status_of(q, r.id) for r in (a, b, c)] == ["running", "running", "queued"]
    assert {q.store.get(a.id).device, q.store.get(b.id).device} == {"cuda:0", "cuda:1"}


def test_stop_writes_stop_file_and_ends_cleanly(make_queue):
    q = make_queue().start()
    run = q.submit(cfg(), name="long")
    wait_for(lambda: len(MetricsTail(run.dir / "metrics.jsonl").read()) >= 3)
    assert "Stopping" in q.stop(run.id)
    wait_for(lambda: status_of(q, run.id) == "stopped")
    assert q.store.get(run.id).reason == "stop requested"
    assert not (run.dir / "STOP").exists()


def test_stubborn_worker_is_terminated_then_killed(make_queue):
    q = make_queue(stop_grace_s=0.2, kill_grace_s=0.3).start()
    run = q.submit(cfg(), name="long stubborn")
    # the worker's own status.json, written once it ignores SIGTERM (the registry says running from the launch on,
    # and a SIGTERM before the worker's handler is set would end it, not test the escalation to SIGKILL)
    wait_for(lambda: status_of(q, run.id) == "running" and read_status(run.dir).get("status") == "running")
    q.stop(run.id)
    wait_for(lambda: status_of(q, run.id) == "stopped", timeout=20)
    assert "SIGKILL" in q.store.get(run.id).reason


def test_crash_marks_failed_with_reason_and_server_survives(make_queue):
    q = make_queue().start()
    bad = q.submit(cfg(), name="crash")
    good = q.submit(cfg(), name="fine")
    wait_for(lambda: status_of(q, good.id) == "completed")
    r = q.store.get(bad.id)
    assert r.status == "failed" and "code 1" in r.reason and "out of memory" in r.reason
    assert "Traceback" in log_tail(r.dir) and r.steps == 2


def test_sigkill_marks_interrupted_with_last_metrics_then_resume(make_queue):
    q = make_queue().start()
    run = q.submit(cfg(), name="long")
    wait_for(lambda: len(MetricsTail(run.dir / "metrics.jsonl").read()) >= 4)
    os.kill(q.store.get(run.id).pid, signal.SIGKILL)
    wait_for(lambda: status_of(q, run.id) == "interrupted")
    r = q.store.get(run.id)
    assert "SIGKILL" in r.reason and r.steps >= 2
    q.resume(run.id)
    wait_for(lambda: "resumed" in (run.dir / "train.log").read_text())
    assert status_of(q, run.id) == "running" and q.store.get(run.id).resume == 1
    q.stop(run.id)
    wait_for(lambda: status_of(q, run.id) == "stopped")


def test_restart_reattaches_live_worker_and_settles_dead_ones(make_queue, tmp_path):
    q1 = make_queue().start()
    run = q1.submit(cfg(), name="long")
    wait_for(lambda: status_of(q1, run.id) == "running")
    worker = q1.workers[run.id].popen
    q1.shutdown()  # the studio goes away; the worker keeps running

    dead = q1.store.create(cfg(), name="ghost", status="running")
    q1.store.update(dead.id, pid=2**22 + 12345)  # no such process

    q2 = make_queue(store=RunStore(tmp_path / "data")).start()
    assert run.id in q2.workers and q2.workers[run.id].popen is None
    assert status_of(q2, dead.id) == "interrupted"
    q2.stop(run.id)
    wait_for(lambda: status_of(q2, run.id) == "stopped")
    worker.wait(timeout=10)


def test_outcome_rules(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"status": "running"}))
    assert outcome(tmp_path, -9, stop_requested=False)[0] == "interrupted"
    assert outcome(tmp_path, -15, stop_requested=True)[0] == "stopped"
    assert outcome(tmp_path, 1, stop_requested=False)[0] == "failed"
    assert outcome(tmp_path, 0, stop_requested=False)[0] == "failed"  # exited without a result
    assert outcome(tmp_path, -1000, stop_requested=False)[0] == "interrupted"
    (tmp_path / "status.json").write_text(json.dumps({"status": "failed", "reason": "loss is NaN at step 3"}))
    assert outcome(tmp_path, 3, stop_requested=False) == ("failed", "loss is NaN at step 3")


def test_worker_command_shapes(tmp_path):
    assert worker_command(tmp_path, False)[1:5] == ["-m", "core", "train", "--config"]
    assert worker_command(tmp_path, True)[-1] == "--resume"
    multi = worker_command(tmp_path, False, gpus=4)
    assert "torch.distributed.run" in multi and "--nproc_per_node=4" in multi


def test_metrics_tail_ignores_partial_and_garbage_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"type": "step", "step": 1, "loss": 2.0}\nnot json\n{"type": "st')
    tail = MetricsTail(p)
    assert len(tail.read()) == 1
    with open(p, "a") as f:
        f.write('ep", "step": 2, "loss": 1.0}\n')
    events = tail.read()
    assert [e["step"] for e in events] == [1, 2]
    assert summarize(events)["final_loss"] == 1.0


# ---- the real engine (core.train) on a tiny model -------------------------------------------------------


def test_real_worker_killed_then_resumed_to_completion(tmp_path, tiny_model_dir):
    from pathlib import Path

    from core.checkpoint import list_checkpoints
    from core.config import DataConfig

    sample = Path(__file__).resolve().parent.parent / "assets" / "identity_sample.json"
    q = JobQueue(RunStore(tmp_path / "data"), slots=["cpu"], poll_s=0.1).start()
    try:
        cfg = RunConfig(model=tiny_model_dir, method=LoraConfig(r=4),
                        train=TrainConfig(max_steps=30, batch_size=2, max_len=96, save_every=2, lr=1e-3),
                        data=DataConfig(path=str(sample)))
        run = q.submit(cfg, name="real")
        # a complete checkpoint, not merely a non-empty checkpoints/ folder: the half-written .step-2.tmp-* of a
        # checkpoint being saved appears there first, and a kill at that moment leaves nothing to resume from
        wait_for(lambda: bool(list_checkpoints(q.store.get(run.id).dir)), timeout=240)
        os.kill(q.store.get(run.id).pid, signal.SIGKILL)
        wait_for(lambda: status_of(q, run.id) == "interrupted", timeout=60)
        assert "SIGKILL" in q.store.get(run.id).reason
        q.resume(run.id)
        wait_for(lambda: status_of(q, run.id) in ("completed", "failed"), timeout=240)
        r = q.store.get(run.id)
        assert r.status == "completed", (r.reason, log_tail(r.dir))
        assert r.steps == 30 and r.trainable and r.has_adapter
        assert "resumed from step" in (r.dir / "train.log").read_text()
    finally:
        q.shutdown()
