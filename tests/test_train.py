"""The training loop (core.train) on a tiny Llama that uses the real SmolLM2 tokenizer (vocab 49152).

Helpers here (``tiny_lm``, ``save_tiny_lm``, ``write_qa``, ``run``) are shared with test_generate, test_cli and
test_dist."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from core import linear
from core.checkpoint import list_checkpoints, load_adapter
from core.config import DataConfig, RunConfig, TrainConfig, method_config
from core.events import EndEvent, EvalEvent, StartEvent, Status, StepEvent, read_events, read_status
from core.forward import packed
from core.methods.full import FullConfig
from core.methods.lora import LoraConfig
from core.forward import logits
from core.models import load_tokenizer
from core.schedules import lr_multiplier
from core.train import STOP_FILE, train

# ---- shared helpers ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tokenizer():
    return load_tokenizer()  # the cached SmolLM2 tokenizer: vocab 49152, ChatML template


def tiny_lm(seed: int = 0, layers: int = 2, init: float = 0.02) -> LlamaForCausalLM:
    """A 2-block Llama (hidden 32, GQA 4/2 heads) with SmolLM2's vocabulary; seeded, fp32, frozen, eval mode."""
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=1, eos_token_id=2, initializer_range=init,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    model.requires_grad_(False)
    return model


def save_tiny_lm(folder: Path, **kw) -> Path:
    """tiny_lm saved with save_pretrained, tokenizer alongside: loadable with --model FOLDER."""
    tiny_lm(**kw).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def write_qa(path: Path, n: int = 16) -> Path:
    """n question/answer rows whose answers have different lengths (so micro-batches differ in token counts)."""
    rows = [{"question": f"What is {a} times three?", "answer": " ".join([str(3 * a)] * (1 + a % 4))} for a in range(n)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def run_config(data: Path, method=None, **train_kw) -> RunConfig:
    # fp32 unless a test asks: "auto" would be bf16 on a CPU with AVX512-BF16, and these tests compare numbers
    defaults = dict(lr=1e-2, max_steps=4, batch_size=4, max_len=64, warmup_steps=0, scheduler="constant",
                    precision="fp32")
    defaults.update(train_kw)
    return RunConfig(
        model="tiny",
        method=method or LoraConfig(r=4),
        train=TrainConfig(**defaults),
        data=DataConfig(path=str(data), val_fraction=0.0),
    )


def run(cfg: RunConfig, run_dir: Path, model=None, resume: bool = False, on_event=None) -> list[dict]:
    model = model if model is not None else tiny_lm()
    events = []
    for e in train(cfg, run_dir, resume=resume, model=model, tokenizer=tokenizer()):
        events.append(e)
        if on_event:
            on_event(e)
    return events


def steps(events):
    return [e for e in events if e["type"] == "step"]


# ---- tests ---------------------------------------------------------------------------------------------------


def test_loss_falls_and_files_follow_the_schema(tmp_path):
    data = write_qa(tmp_path / "qa.json", n=8)
    cfg = run_config(data, method=FullConfig(), max_steps=12, lr=1e-2)
    cfg.data.val_count = 2
    cfg.train.eval_every = 5
    events = run(cfg, tmp_path / "run")
    s = steps(events)
    assert s[-1]["loss"] < 0.6 * s[0]["loss"], [e["loss"] for e in s]

    # event schema
    start, end = events[0], events[-1]
    assert start["type"] == "start" and end["type"] == "end"
    assert set(start) == set(StartEvent.__annotations__) and set(end) == set(EndEvent.__annotations__)
    assert start["total_steps"] == 12 and start["method"] == "full" and start["num_layers"] == 2
    assert [g["depth"] for g in start["groups"]] == [-1, 0, 1, 2]
    for e in s:
        assert set(e) == set(StepEvent.__annotations__)
        assert set(e["grad_norm"]) == {"embed", "block 0", "block 1", "head", "total"} and e["tokens_per_s"] > 0
    assert [e["step"] for e in s] == list(range(1, 13))
    evals = [e for e in events if e["type"] == "eval"]
    assert all(set(e) == set(EvalEvent.__required_keys__) for e in evals[:-1])  # periodic: the loss only
    assert set(evals[-1]) - set(EvalEvent.__required_keys__) <= set(EvalEvent.__optional_keys__)  # the end: all
    assert evals[-1]["task_metric"] == "rouge_l"  # tests/test_evaluate.py checks the end-of-run event in full
    assert [e["step"] for e in evals] == [5, 10, 12] and all(math.isfinite(e["eval_loss"]) for e in evals)
    assert end["status"] == "completed"

    # files
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(events))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert set(status) == set(Status.__required_keys__) and read_status(tmp_path / "run") == status
    assert read_events(tmp_path / "run") == lines
    assert status["status"] == "completed" and status["step"] == 12 and status["pid"] == os.getpid()
    assert "loss" in (tmp_path / "run" / "train.log").read_text()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-12"]


def test_llrd_and_unfreezing_act_on_the_optimizer_groups(tmp_path):
    data = write_qa(tmp_path / "qa.json", n=8)
    decay, lr, L = 0.5, 1e-3, 2
    cfg = run_config(data, method=FullConfig(unfreeze_every=2), max_steps=7, lr=lr, llrd_decay=decay,
                     warmup_steps=2, scheduler="cosine", weight_decay=0.1)
    model = tiny_lm()
    embed_before = model.model.embed_tokens.weight.detach().clone()
    seen = {}

    def watch(e):  # the embeddings (released last) must not move while they are frozen
        if e["type"] == "step" and e["step"] <= 6:
            seen[e["step"]] = torch.equal(model.model.embed_tokens.weight, embed_before)

    events = run(cfg, tmp_path / "run", model=model, on_event=watch)
    names = {g["name"] for g in events[0]["groups"]}
    assert names == {"embed", "block 0", "block 0 (no decay)", "block 1", "block 1 (no decay)",
                     "head (no decay)"}
    factor = {"-1": decay**L, "0": decay ** (L - 1), "1": 1.0, "2": 1.0}  # lr_l = lr·decay^(L−l−1)
    for e in steps(events):
        k = e["step"] - 1  # the 0-based step whose lr the event reports
        below = max(-1, L - 1 - k // 2)  # gradual unfreezing: top block first, one more every 2 steps
        for depth, f in factor.items():
            expected = lr * f * lr_multiplier(k, 7, 2, "cosine") if int(depth) >= below else 0.0
            assert e["lr_by_depth"][depth] == pytest.approx(expected, rel=1e-12, abs=1e-15), (e["step"], depth)
        trained = {lab for lab in e["grad_norm"] if lab != "total"}
        expect_trained = {"head", "block 1"} | ({"block 0"} if below <= 0 else set()) | ({"embed"} if below <= -1 else set())
        assert trained == expect_trained, (e["step"], trained)
    assert all(seen[s] for s in range(1, 5)) and not seen[6]  # embeddings join at step index 4 (k // 2 == 2)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    data = write_qa(tmp_path / "qa.json", n=8)  # answers of 1..4 numbers: micro-batches differ in token count
    big = run(run_config(data, max_steps=3, batch_size=8, grad_accum=1, max_grad_norm=0.0), tmp_path / "big")
    acc = run(run_config(data, max_steps=3, batch_size=2, grad_accum=4, max_grad_norm=0.0), tmp_path / "acc")
    for a, b in zip(steps(big), steps(acc)):  # one step = the whole dataset in both runs
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for k in a["grad_norm"]:
            assert a["grad_norm"][k] == pytest.approx(b["grad_norm"][k], rel=1e-4)
    ta = load_file(str(tmp_path / "big" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "acc" / "adapter" / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)


def test_grad_checkpointing_changes_nothing_but_memory(tmp_path):
    data = write_qa(tmp_path / "qa.json", n=8)

    def traced(cfg, out):
        """The run's events, whether checkpointing was on at each step event, and how many tensors autograd
        saved for backward (checkpointing keeps only each block's input and recomputes the rest in backward)."""
        model, on, saved = tiny_lm(), [], [0]

        def pack(t):
            saved[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            events = run(cfg, out, model=model,
                         on_event=lambda e: e["type"] == "step" and on.append(model.is_gradient_checkpointing))
        return events, on, saved[0], model.is_gradient_checkpointing

    plain, plain_on, plain_saved, plain_after = traced(run_config(data, max_steps=2), tmp_path / "plain")
    ckpt, ckpt_on, ckpt_saved, ckpt_after = traced(run_config(data, max_steps=2, grad_checkpointing=True),
                                                   tmp_path / "ckpt")
    assert plain_on == [False, False] and ckpt_on == [True, True]
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
    assert not plain_after and not ckpt_after  # switched off again when the run ends
    assert [e["loss"] for e in steps(plain)] == pytest.approx([e["loss"] for e in steps(ckpt)], rel=1e-6)
    assert [e["grad_norm"]["total"] for e in steps(plain)] == pytest.approx(
        [e["grad_norm"]["total"] for e in steps(ckpt)], rel=1e-5)


def test_unfreezing_by_epochs_acts_in_the_loop(tmp_path):
    data = write_qa(tmp_path / "qa.json", n=8)  # batch 4: two optimiser steps per epoch
    cfg = run_config(data, method=FullConfig(unfreeze_every=1, unfreeze_unit="epochs"), max_steps=6, lr=1e-3)
    events = run(cfg, tmp_path / "run")
    s = steps(events)
    assert [e["epoch"] for e in s] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    for e in s:
        epoch = (e["step"] - 1) // 2  # the epoch the step ran in (steps 1-2: epoch 0, 3-4: 1, 5-6: 2)
        below = max(-1, 1 - epoch)  # the top block (1) and head train from the start, one block more per epoch
        for depth, lr in e["lr_by_depth"].items():
            if int(depth) >= below:
                assert lr == pytest.approx(1e-3), (e["step"], depth)
            else:
                assert lr == 0.0, (e["step"], depth)
    assert [e["lr_by_depth"]["0"] > 0 for e in s] == [False, False, True, True, True, True]
    assert [e["lr_by_depth"]["-1"] > 0 for e in s] == [False, False, False, False, True, True]


@pytest.mark.parametrize(
    "method",
    [
        LoraConfig(r=4, dropout=0.2),  # dropout: the RNG must be restored
        method_config("prefix_tuning", {"num_virtual_tokens": 3, "encoder_hidden": 16}),  # MLP not in the adapter
        method_config("fishmask", {"keep_ratio": 0.01, "fisher_batches": 1}),  # mask from prepare()
        FullConfig(unfreeze_every=2),  # unfreezing state + AdamW state of a whole model
    ],
    ids=lambda m: m.method,
)
def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path, method):
    data = write_qa(tmp_path / "qa.json", n=12)  # 3 micro-batches per epoch: the stop falls mid-epoch
    cfg = run_config(data, method=method, max_steps=7, lr=5e-3, weight_decay=0.01, warmup_steps=2,
                     scheduler="cosine", grad_accum=1)
    whole = run(cfg, tmp_path / "whole")

    def stop_after_4(e):
        if e["type"] == "step" and e["step"] == 4:
            (tmp_path / "split" / STOP_FILE).write_text("")

    first = run(cfg, tmp_path / "split", on_event=stop_after_4)
    assert first[-1]["status"] == "stopped" and first[-1]["step"] == 4
    second = run(cfg, tmp_path / "split", resume=True)  # a fresh base model, as a new worker process would have
    assert second[0]["resumed_from"] == 4 and second[-1]["status"] == "completed"
    assert [e["loss"] for e in steps(first) + steps(second)] == [e["loss"] for e in steps(whole)]
    tokens = [e["supervised_tokens"] for e in steps(whole)]  # the running count continues across the resume
    assert [e["supervised_tokens"] for e in steps(first) + steps(second)] == tokens and tokens[0] < tokens[-1]
    ta = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # the metrics file tells one story: steps 1..7 once each
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e["type"] == "step"] == list(range(1, 8))
    assert len(list_checkpoints(tmp_path / "split")) <= 2


def _nan_after(model, calls: int):
    count = {"n": 0}

    def hook(module, inputs, output):
        count["n"] += 1
        return output * float("nan") if count["n"] > calls else output

    return model.model.norm.register_forward_hook(hook)


@pytest.mark.parametrize("log_every", [1, 5])
def test_nan_loss_fails_the_run_without_poisoned_files(tmp_path, log_every, monkeypatch):
    import core.forward

    data = write_qa(tmp_path / "qa.json", n=8)
    cfg = run_config(data, max_steps=8, save_every=1, log_every=log_every)
    model = tiny_lm()
    monkeypatch.setattr(core.forward, "PREFIX_MIN", 10**6)  # no separate forward of the shared system prompt
    _nan_after(model, calls=2)  # one forward per step: NaN from step 3 on
    events = run(cfg, tmp_path / "run", model=model)
    end = events[-1]
    assert end["status"] == "failed" and "NaN" in end["reason"] and "step 3" in end["reason"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "NaN" in status["reason"]
    assert not (tmp_path / "run" / "adapter").exists()
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-1", "step-2"]
    for ckpt in kept:
        for t in load_file(str(ckpt / "trainable.safetensors")).values():
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("how", ["file", "sigterm"])
def test_stop_request_saves_a_usable_adapter(tmp_path, how):
    data = write_qa(tmp_path / "qa.json", n=8)
    cfg = run_config(data, max_steps=50)
    model = tiny_lm()

    def stop_after_2(e):
        if e["type"] == "step" and e["step"] == 2:
            if how == "file":
                (tmp_path / "run" / STOP_FILE).write_text("")
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    events = run(cfg, tmp_path / "run", model=model, on_event=stop_after_2)
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers are restored
    end = events[-1]
    assert end["status"] == "stopped" and end["step"] == 2
    assert ("STOP" if how == "file" else "SIGTERM") in end["reason"]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "stopped"
    fresh = tiny_lm()
    method = load_adapter(fresh, tmp_path / "run" / "adapter")
    linear.use(fresh)  # the products train() ran the model with (core.linear), so the two agree to the bit
    ids = torch.tensor([[1, 500, 600, 700, 2]])
    torch.testing.assert_close(logits(fresh, method, ids), logits(model, None, ids), rtol=0, atol=0)


def test_bad_data_fails_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="bad.json"):
        run(run_config(bad), tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "bad.json" in status["reason"]


def test_the_shared_system_prompt_runs_once_and_trains_as_the_whole_rows(tmp_path, monkeypatch):
    """Rows rendered with the chat template share its system prompt: each micro-batch runs it once
    (core.forward.SharedPrefix), with the same losses and gradient norms as running it in every row."""
    import core.forward
    import core.train as core_train

    cfg = run_config(write_qa(tmp_path / "qa.json", n=16), max_steps=4, batch_size=4)
    shared = []
    monkeypatch.setattr(core_train, "SharedPrefix", lambda m, meth, ids: shared.append(ids.shape[1]) or
                        core.forward.SharedPrefix(m, meth, ids))
    got = steps(run(cfg, tmp_path / "shared"))
    assert len(shared) == 4 and min(shared) >= 20  # every micro-batch, at least the system prompt
    monkeypatch.setattr(core.forward, "PREFIX_MIN", 10**6)  # nothing is worth sharing: every row runs whole
    want = steps(run(cfg, tmp_path / "whole"))
    assert len(shared) == 4
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in want], rel=1e-5)
    assert [e["grad_norm"]["total"] for e in got] == pytest.approx([e["grad_norm"]["total"] for e in want], rel=1e-4)


@pytest.mark.parametrize("layout", ["cpu: after the shared prefix", "cuda: no prefix"])
def test_packed_rows_train_as_the_length_tight_pieces(layout, tmp_path, monkeypatch):
    """Padding-free packed rows (core.train._work), as the CPU runs them (after the micro-batch's shared prefix,
    core.attention splitting the sequences) and as CUDA does (PACKED_ON: no prefix): the same losses and gradient
    norms as length-tight pieces, step after step."""
    import core.train as core_train

    cfg = run_config(write_qa(tmp_path / "qa.json", n=16), max_steps=4, batch_size=4)
    if layout.startswith("cuda"):
        monkeypatch.setattr(core_train, "PACKED_ON", ("cpu",))
    calls = []
    monkeypatch.setattr(core_train, "packed", lambda *a, **k: calls.append(k.get("start", 0)) or packed(*a, **k))
    got = steps(run(cfg, tmp_path / "packed"))
    assert len(calls) == 4  # every micro-batch went through packing
    assert all(calls) if layout.startswith("cpu") else not any(calls)  # positions continue after a prefix or not
    monkeypatch.setattr(core_train, "packs", lambda *a: False)
    want = steps(run(cfg, tmp_path / "pieces"))
    assert len(calls) == 4
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in want], rel=1e-5)
    assert [e["grad_norm"]["total"] for e in got] == pytest.approx([e["grad_norm"]["total"] for e in want], rel=1e-4)
