"""CPU threads: the studio splits the cores between training, evaluation and chat; a worker follows its share."""

import sys
import textwrap
import time

import pytest
import torch

from core.config import RunConfig, TrainConfig
from core.methods.lora import LoraConfig
from core.threads import THREADS_FILE, ThreadShare, share, usable_cores, write_share
from studio.cores import CoreShare
from studio.jobs import JobQueue
from studio.store import RunStore

from test_train import run, run_config, write_qa

TWO_CORES = pytest.mark.skipif(usable_cores() < 2, reason="needs 2 usable cores")


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_share_splits_evenly_and_never_below_one():
    assert [share(2, n) for n in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert [share(16, n) for n in (1, 2, 3, 4)] == [16, 8, 5, 4]


@TWO_CORES
def test_worker_side_applies_each_new_share_once(tmp_path):
    follower = ThreadShare(tmp_path, torch.device("cpu"))
    assert follower.follow() is None  # no file: the CLI on its own keeps torch's default
    write_share(tmp_path, 1)
    assert follower.follow() == 1 and torch.get_num_threads() == 1
    assert follower.follow() is None  # unchanged: one stat, nothing applied
    time.sleep(0.01)
    (tmp_path / THREADS_FILE).write_text("many")
    assert follower.follow() is None and torch.get_num_threads() == 1  # garbage keeps the current count
    time.sleep(0.01)
    write_share(tmp_path, 64)
    assert follower.follow() == usable_cores()  # capped at the cores this process may use
    assert ThreadShare(tmp_path, torch.device("cuda")).follow() is None  # GPU runs ignore it


@TWO_CORES
def test_training_loop_takes_a_new_share_between_steps(tmp_path):
    torch.set_num_threads(2)
    data = write_qa(tmp_path / "qa.json", n=8)
    seen = []

    def on_event(e):
        if e["type"] == "step" and e["step"] == 1:
            write_share(tmp_path / "run", 1)
        seen.append(torch.get_num_threads())

    run(run_config(data, max_steps=3, log_every=1), tmp_path / "run", on_event=on_event)
    assert seen[0] == 2 and seen[-1] == 1


def test_studio_split_follows_what_joins_and_leaves(tmp_path):
    cores = CoreShare(cores=2)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    threads = lambda d: int((d / THREADS_FILE).read_text())  # noqa: E731
    assert cores.join("run-a", a) == 2 and threads(a) == 2
    with cores.held("chat") as n:
        assert n == 1 and threads(a) == 1  # a chat reply: the run gives one core up
    assert threads(a) == 2  # and takes it back when the reply ends
    cores.join("run-b", b)
    assert threads(a) == threads(b) == 1
    cores.leave("run-b")
    assert threads(a) == 2 and cores.threads() == 2


FOLLOWING_WORKER = textwrap.dedent(
    r'''
    import json, os, sys, time
    import torch
    from core.threads import ThreadShare
    out = sys.argv[sys.argv.index("--out") + 1]
    follower = ThreadShare(__import__("pathlib").Path(out), torch.device("cpu"))
    seen = []
    for _ in range(400):
        follower.follow()
        seen.append(torch.get_num_threads())
        part = os.path.join(out, "seen.json.part")
        with open(part, "w") as f:
            f.write(json.dumps(seen))
        os.replace(part, os.path.join(out, "seen.json"))  # the test never reads a half-written file
        if os.path.exists(os.path.join(out, "STOP")):
            break
        time.sleep(0.02)
    '''
)


@TWO_CORES
def test_queue_starts_a_cpu_worker_with_its_share_and_re_splits_for_chat(tmp_path):
    """A real worker process: starts with OMP_NUM_THREADS = its share, drops to 1 while chat holds a core."""
    import json

    script = tmp_path / "worker.py"
    script.write_text(FOLLOWING_WORKER)
    store = RunStore(tmp_path / "data")
    cores = CoreShare(cores=2)
    queue = JobQueue(store, slots=["cpu"], command=lambda d, r: [sys.executable, str(script), "--out", str(d)],
                     poll_s=0.05, cores=cores).start()
    run_id = queue.submit(RunConfig(model="tiny", method=LoraConfig(), train=TrainConfig(max_steps=1)), name="t").id
    seen_file = store.run_dir(run_id) / "seen.json"

    def seen():
        return json.loads(seen_file.read_text()) if seen_file.exists() else []

    try:
        deadline = time.time() + 30
        while not seen() and time.time() < deadline:
            time.sleep(0.05)
        assert seen()[0] == 2
        with cores.held("chat"):
            time.sleep(0.5)
            assert seen()[-1] == 1
        time.sleep(0.5)
        assert seen()[-1] == 2
    finally:
        (store.run_dir(run_id) / "STOP").write_text("")
        queue.shutdown()
        for w in queue.workers.values():
            w.popen.wait(timeout=10)


@TWO_CORES
def test_a_chat_reply_yields_to_a_training_job_and_takes_every_core_when_alone(tmp_path, tiny_model_dir):
    from core.generate import GenerationSettings
    from studio.chat import ChatService, Column

    cores = CoreShare(cores=2)
    (tmp_path / "run").mkdir()
    cores.join("run", tmp_path / "run")
    chat = ChatService(cores)
    settings = GenerationSettings(max_new_tokens=3, temperature=0.0)
    ask = lambda: chat.reply(tiny_model_dir, [Column("base", "base", None)], [[{"role": "user", "content": "Hi"}]],  # noqa: E731
                             settings)
    during = [int((tmp_path / "run" / THREADS_FILE).read_text()) for _ in ask()]
    assert during and set(during) == {2}  # the run keeps both cores (the reply: in_background, tested below)
    cores.leave("run")
    assert [torch.get_num_threads() for _ in ask()][-1] == 2  # nothing trains: the reply takes both


def test_background_items_come_from_a_thread_of_lower_priority():
    import os
    import threading

    from studio.chat import in_background

    def niceness():
        yield os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        yield torch.get_num_threads()

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert list(in_background(niceness(), 7)) == [max(base, 7), 1]

    def broken():
        yield "a"
        raise ValueError("the prompt is empty")

    got = []
    with pytest.raises(ValueError, match="prompt is empty"):
        for item in in_background(broken(), 7):
            got.append(item)
    assert got == ["a"]


def test_chat_updates_come_a_few_a_second_and_carry_every_token():
    """studio.chat.coalesced: the first piece at once, then at most one every ``every`` seconds, each all the text
    decoded since the previous one; the concatenation is the whole reply; closing it stops the decoding; an error
    still shows what was decoded before it."""
    import time

    from studio.chat import coalesced

    made: list[str] = []

    def tokens(n=40, every_s=0.005):
        for k in range(n):
            time.sleep(every_s)
            made.append(f"t{k} ")
            yield f"t{k} "

    start, chunks, times = time.perf_counter(), [], []
    for chunk in coalesced(tokens(), every=0.05):
        chunks.append(chunk)
        times.append(time.perf_counter() - start)
    assert "".join(chunks) == "".join(f"t{k} " for k in range(40))
    assert chunks[0] == "t0 " and times[0] < 0.05  # the first token is shown at once
    assert len(chunks) <= 8  # ~0.25 s of tokens in pieces of >= 0.05 s, not 40 updates
    assert all(b - a >= 0.045 for a, b in zip(times[1:-1], times[2:-1]))

    made.clear()
    it = coalesced(tokens(n=1000, every_s=0.002), every=0.0)
    next(it)
    it.close()  # the user left: decoding stops
    assert len(made) < 5

    def broken():
        yield "a"
        raise ValueError("the prompt is empty")

    got = []
    with pytest.raises(ValueError, match="prompt is empty"):
        for chunk in coalesced(broken()):
            got.append(chunk)
    assert got == ["a"]  # what was decoded before the error is still shown
