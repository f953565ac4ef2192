"""Data parallel training: ``torchrun --nproc_per_node 2`` on CPU (gloo) gives the loss and the weights of one
process that accumulates the same global batch (2 ranks x 1 micro-batch == 1 process x 2 micro-batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.config import DataConfig, RunConfig, TrainConfig
from core.methods.lora import LoraConfig
from core.models import load_model
from core.train import train
from test_train import save_tiny_lm, write_qa

ROOT = Path(__file__).resolve().parents[1]


def _config(model_dir: Path, data: Path, grad_accum: int) -> RunConfig:
    return RunConfig(
        model=str(model_dir),
        method=LoraConfig(r=4, targets=["q_proj", "v_proj"]),
        train=TrainConfig(lr=1e-2, max_steps=3, batch_size=3, grad_accum=grad_accum, max_len=64, device="cpu",
                          scheduler="linear", weight_decay=0.01, seed=3),
        data=DataConfig(path=str(data), val_count=3),
    )


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", init=0.5)
    data = write_qa(tmp_path / "qa.json", n=15)  # 12 train: 4 micro-batches of 3, a step takes 2

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    _config(model_dir, data, grad_accum=1).save(ddp_dir / "config.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "core", "train", "--config", str(ddp_dir / "config.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]

    model, tok = load_model(str(model_dir), device="cpu")
    single = list(train(_config(model_dir, data, grad_accum=2), tmp_path / "single", model=model, tokenizer=tok))

    events = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("start") == 1  # only rank 0 writes
    assert events[0]["world_size"] == 2 and events[-1]["status"] == "completed"
    pick = lambda evs, t, k: [e[k] for e in evs if e["type"] == t]  # noqa: E731
    assert pick(events, "step", "loss") == pytest.approx(pick(single, "step", "loss"), rel=1e-5)
    # the gradient itself (AdamW alone would hide a wrong scale): the norms before clipping, per block
    for g_ddp, g_one in zip(pick(events, "step", "grad_norm"), pick(single, "step", "grad_norm")):
        assert g_ddp == pytest.approx(g_one, rel=1e-4)
    assert pick(events, "eval", "eval_loss") == pytest.approx(pick(single, "eval", "eval_loss"), rel=1e-5)
    a = load_file(str(ddp_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
