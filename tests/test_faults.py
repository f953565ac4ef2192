"""Faults (issue 6): a worker killed outright, a full disk while checkpointing, out of memory, corrupt or
mismatched adapter/checkpoint folders, and a planted malicious pickle. Tiny Llama folders, CLI in-process
(``core.__main__.main``) except for the SIGKILL, which needs a real worker process.

NaN/inf loss is covered in test_train.py (test_nan_loss_fails_the_run_without_poisoned_files): the run ends
failed naming the step, and no adapter or checkpoint with non-finite tensors is written."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import core.checkpoint as ckpt_mod
import core.train as train_mod
from core.__main__ import main
from core.checkpoint import latest_checkpoint, list_checkpoints, load_adapter, save_adapter
from core.events import pid_alive
from core.methods.lora import LoraConfig
from core.methods import build_method
from core.train import recover_status
from test_cli import ROOT, tiny  # noqa: F401 - the module fixture: (tiny model folder, qa.json)
from test_train import tiny_lm, tokenizer

LORA = ["--method", "lora", "--r", "4", "--dropout", "0.1", "--lr", "0.01", "--batch-size", "4", "--max-len", "64",
        "--val-fraction", "0", "--scheduler", "constant", "--warmup-steps", "0", "--seed", "3"]


def train_flags(model_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), *LORA, *extra]


@contextmanager
def one_thread():
    """In-process runs compute like the OMP_NUM_THREADS=1 workers, so their floats match bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def adapter_tensors(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def step_events(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in lines if e["type"] == "step"]


# ---- worker killed -------------------------------------------------------------------------------------------


def test_sigkill_mid_run_status_recovers_checkpoint_intact_resume_matches(tiny, tmp_path, capsys):
    model_dir, data = tiny
    run, ref = tmp_path / "run", tmp_path / "ref"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "core", *train_flags(model_dir, data, "--max-steps", "100000",
                                                                     "--save-every", "2", "--out", str(run))],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None and not list_checkpoints(run):
            time.sleep(0.02)
        assert p.poll() is None, p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)  # no handler runs: nothing gets to say "stopped"
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL

    # status.json still says running: a lie only recover_status can correct
    assert status(run)["status"] == "running" and status(run)["pid"] == p.pid
    settled = recover_status(run)
    assert settled == status(run)  # written back
    ckpt = latest_checkpoint(run)
    s = int(ckpt.name.split("-")[1])
    last = settled["last_metrics"]
    assert settled["status"] == "interrupted" and settled["checkpoint"] == ckpt.name
    assert last["step"] >= s and last["loss"] > 0 and settled["step"] == last["step"]
    assert f"after step {last['step']}" in settled["reason"]
    assert f"resume continues from {ckpt.name}" in settled["reason"]
    assert recover_status(run) == settled  # idempotent
    ends = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"end"' in x]
    assert [e["status"] for e in ends] == ["interrupted"]

    # the last checkpoint is intact: every file loads (safetensors, weights-only torch.load, JSON)
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    load_adapter(base, ckpt / "adapter")
    assert load_file(str(ckpt / "trainable.safetensors"))
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == s

    # resume to step s+3 ends with the very weights of an uninterrupted run to s+3; a stale temp folder goes
    final = s + 3
    (run / "checkpoints" / f".step-{s + 1}.tmp-deadbeef").mkdir()
    with one_thread():
        assert main(["train", "--config", str(run / "config.yaml"), "--resume", "--max-steps", str(final)]) == 0
        assert main(train_flags(model_dir, data, "--max-steps", str(final), "--save-every", "2", "--out",
                                str(ref))) == 0
    capsys.readouterr()
    assert status(run)["status"] == "completed" and not (run / "checkpoints" / f".step-{s + 1}.tmp-deadbeef").exists()
    a, b = adapter_tensors(run), adapter_tensors(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert step_events(run) == list(range(1, final + 1))


def test_recover_status_leaves_live_and_finished_runs_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert recover_status(run) == {}  # never started
    st = {"status": "running", "step": 3, "total_steps": 9, "reason": "", "pid": os.getpid(), "updated": 0}
    (run / "status.json").write_text(json.dumps(st))
    assert recover_status(run) == st  # this process lives
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "status.json").write_text(json.dumps(dict(st, pid=dead.pid)))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "start", "total_steps": 9}) + "\n"
                                       + json.dumps({"type": "step", "step": 3, "loss": 1.5, "total_steps": 9}) + "\n"
                                       + '{"type": "step", "st')  # the line the kill cut off
    settled = recover_status(run)
    assert settled["status"] == "interrupted" and settled["step"] == 3 and settled["checkpoint"] is None
    assert "no checkpoint" in settled["reason"] and settled["last_metrics"]["loss"] == 1.5
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["status"] == "interrupted"  # on a line of its own, after the cut one
    (run / "status.json").write_text(json.dumps(dict(st, status="completed", pid=dead.pid)))
    assert recover_status(run)["status"] == "completed"


def test_pid_alive_only_for_a_running_process():
    """core.events.pid_alive, which the studio's queue and registry use too: a bad pid (what a hand-edited
    status.json may hold) is no process, nor is a zombie, nor a reaped child; one we may not signal still is."""
    assert pid_alive(os.getpid()) and pid_alive(1)  # pid 1 exists in every pid namespace
    for bad in (None, 0, -1, True, "1", 1.0, 2**40):
        assert not pid_alive(bad), bad
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)  # exited, not yet reaped: a zombie still answers kill(pid, 0)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)


# ---- disk full -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny, tmp_path, capsys, monkeypatch, writer):
    model_dir, data = tiny
    run = tmp_path / "run"

    def full(real):
        def write(obj, path, *a, **kw):
            if ".step-4.tmp" in str(path):  # the second checkpoint
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(obj, path, *a, **kw)
        return write

    if writer == "safetensors":
        monkeypatch.setattr(ckpt_mod, "save_file", full(ckpt_mod.save_file))
    else:
        monkeypatch.setattr(torch, "save", full(torch.save))
    rc = main(train_flags(model_dir, data, "--max-steps", "8", "--save-every", "2", "--out", str(run)))
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out
    one_error_line(err)
    assert "run failed: could not write checkpoint step-4: No space left on device (the disk is full" in err
    assert "step-2 is intact" in err
    st = status(run)
    assert st["status"] == "failed" and "No space left on device" in st["reason"] and st["step"] == 4
    assert "Traceback" in (run / "train.log").read_text()  # the details are kept for whoever debugs it
    assert [c.name for c in list_checkpoints(run)] == ["step-2"]
    assert [d.name for d in (run / "checkpoints").iterdir()] == ["step-2"]  # no half-written folder
    assert not (run / "adapter").exists()

    monkeypatch.undo()  # space freed: resume picks up from step 2 and finishes
    assert main(["train", "--config", str(run / "config.yaml"), "--resume"]) == 0
    capsys.readouterr()
    assert status(run)["status"] == "completed" and step_events(run) == list(range(1, 9))


# ---- out of memory -------------------------------------------------------------------------------------------


def test_out_of_memory_fails_with_advice_and_a_later_run_works(tiny, tmp_path, capsys, monkeypatch):
    model_dir, data = tiny

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 24 GiB total)")

    monkeypatch.setattr(train_mod, "supervised_loss", oom)  # the forward of the first step
    flags = ["train", "--model", str(model_dir), "--data", str(data), "--method", "full", "--batch-size", "8",
             "--max-steps", "2", "--max-len", "64", "--val-fraction", "0"]
    rc = main([*flags, "--out", str(tmp_path / "oom")])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out
    one_error_line(err)
    assert re.search(r"run failed: out of memory on cpu at step 1; try a smaller batch_size \(now 8", err), err
    assert "grad_checkpointing=true" in err and "a PEFT method such as lora instead of full" in err
    st = status(tmp_path / "oom")
    assert st["status"] == "failed" and "out of memory" in st["reason"]
    assert not (tmp_path / "oom" / "adapter").exists()

    monkeypatch.undo()  # the same process trains the next run normally
    assert main([*flags, "--out", str(tmp_path / "next")]) == 0
    capsys.readouterr()
    assert status(tmp_path / "next")["status"] == "completed"


# ---- corrupt, partial or mismatched adapter folders ------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapter(tiny, tmp_path_factory):
    """A LoRA adapter (B moved off zero) for the tiny model folder, saved as training would save it."""
    model_dir, _ = tiny
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    method = build_method(LoraConfig(r=4))
    method.apply(model)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            p.add_(0.1)
    return save_adapter(model, method, tmp_path_factory.mktemp("adapters") / "good", base_model=str(model_dir))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncate(folder: Path) -> None:
    p = folder / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _drop_key(folder: Path) -> None:
    t = load_file(str(folder / "adapter_model.safetensors"))
    t.pop(sorted(t)[0])
    save_file(t, str(folder / "adapter_model.safetensors"))


def _reshape(folder: Path) -> None:
    t = load_file(str(folder / "adapter_model.safetensors"))
    k = sorted(t)[0]
    t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])
    save_file(t, str(folder / "adapter_model.safetensors"))


DAMAGE = {
    "missing weights": (lambda f: (f / "adapter_model.safetensors").unlink(),
                        "is incomplete: adapter_model.safetensors is missing"),
    "missing sidecar": (lambda f: (f / "peft_studio.json").unlink(), "is incomplete: peft_studio.json is missing"),
    "truncated safetensors": (_truncate, "is corrupt: adapter_model.safetensors cannot be read"),
    "garbage sidecar": (lambda f: (f / "peft_studio.json").write_text("{not json"),
                        "is corrupt: peft_studio.json is not valid JSON"),
    "garbage adapter_config": (lambda f: (f / "adapter_config.json").write_bytes(b"\x00\xff garbage"),
                               "is corrupt: adapter_config.json is not valid JSON"),
    "sidecar without method": (lambda f: (f / "peft_studio.json").write_text('{"method": "magic"}'),
                               "names no known method"),
    "missing key": (_drop_key, "does not match this model: missing keys"),
    "wrong shape": (_reshape, r"does not match this model: .* has shape"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_corrupt_adapter_folder_is_refused_in_one_sentence(tiny, saved_adapter, tmp_path, capsys, case):
    model_dir, _ = tiny
    damage, message = DAMAGE[case]
    folder = _copy(saved_adapter, tmp_path / "adapter")
    damage(folder)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        load_adapter(model, folder)
    assert "\n" not in str(err.value)
    after = model.state_dict()  # refused without leaving the model half-adapted
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    rc = main(["generate", "--run", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    err = one_error_line(capsys.readouterr().err)
    assert rc == 2 and re.search(message, err), err


def _other_base(kind: str):
    vocab = len(tokenizer())
    common = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    if kind == "hidden_size":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, **common))
    if kind == "num_layers":
        return tiny_lm(layers=3)
    if kind == "vocab_size":
        return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, **common))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, **common))


@pytest.mark.parametrize("kind", ["model_type", "hidden_size", "num_layers", "vocab_size"])
def test_adapter_on_a_wrong_base_model_is_refused_naming_the_difference(saved_adapter, tmp_path, capsys, kind):
    other = _other_base(kind).eval()
    with pytest.raises(ValueError, match=rf"different base model \(adapter vs this model: {kind} ") as err:
        load_adapter(other, saved_adapter)
    assert "\n" not in str(err.value)
    if kind in ("hidden_size", "model_type"):  # and through the CLI, with --model pointing at the other base
        other.save_pretrained(tmp_path / "other")
        tokenizer().save_pretrained(tmp_path / "other")
        rc = main(["generate", "--run", str(saved_adapter), "--prompt", "hi", "--model", str(tmp_path / "other"),
                   "--device", "cpu"])
        err = one_error_line(capsys.readouterr().err)
        assert rc == 2 and f"different base model (adapter vs this model: {kind} " in err


# ---- security: weights are never unpickled -------------------------------------------------------------------


class Payload:
    """Unpickling this runs open(marker, "w"): a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def stopped_run(tiny, tmp_path_factory):
    model_dir, data = tiny
    run = tmp_path_factory.mktemp("security") / "run"
    assert main(train_flags(model_dir, data, "--max-steps", "2", "--out", str(run))) == 0
    return run


@pytest.mark.parametrize("target", ["optimizer.pt", "rng.pt"])
def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(stopped_run, tmp_path, capsys, target):
    capsys.readouterr()
    ckpt = latest_checkpoint(stopped_run)
    original = (ckpt / target).read_bytes()
    # the payload is live: a full unpickle would run it
    torch.save({"state": Payload(tmp_path / "proof")}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert (tmp_path / "proof").exists()

    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker), "param_groups": []}, ckpt / target)
    try:
        rc = main(["train", "--config", str(stopped_run / "config.yaml"), "--resume", "--max-steps", "4"])
        err = one_error_line(capsys.readouterr().err)
        assert rc == 2 and f"refused: {target} holds pickled objects other than tensors and plain data" in err
        assert not marker.exists()
        with pytest.raises(ValueError, match="refused"):
            ckpt_mod.load_checkpoint(ckpt, model=torch.nn.Linear(1, 1), optimizer=None)
        assert not marker.exists()
    finally:
        (ckpt / target).write_bytes(original)


def test_planted_pickle_as_adapter_weights_is_refused_and_never_runs(saved_adapter, tmp_path):
    folder = _copy(saved_adapter, tmp_path / "adapter")
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(marker)}, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors cannot be read"):
        load_adapter(tiny_lm(), folder)
    assert not marker.exists()


def test_no_code_path_unpickles_weights():
    """Every torch.load in the engine and the studio passes weights_only=True; nothing calls pickle.load(s)."""
    offenders = []
    for path in [*ROOT.joinpath("core").rglob("*.py"), *ROOT.joinpath("studio").rglob("*.py"), ROOT / "app.py"]:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}"
                      for m in re.finditer(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load", text)]
    assert not offenders, offenders
