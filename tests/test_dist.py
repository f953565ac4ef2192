"""Training across processes: ``torchrun --nproc_per_node 2`` on CPU (gloo) gives the losses and the weights of one
process that accumulates the same global batch (2 ranks x 1 micro-batch == 1 process x 2 micro-batches), under DDP
(LoRA) and under FSDP2 (full fine-tuning with LLRD, and with gradual unfreezing under gradient checkpointing, every
weight sharded across the two ranks). Plus how
``TrainConfig.parallel`` = auto chooses between them, and the settings FSDP2 refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.config import DataConfig, RunConfig, TrainConfig
from core.dist import DistInfo, strategy
from core.methods import build_method
from core.methods.full import FullConfig
from core.methods.lora import LoraConfig
from core.preflight import preflight
from core.models import load_model
from core.train import train
from test_train import save_tiny_lm, write_qa

ROOT = Path(__file__).resolve().parents[1]


CASES = {  # name -> (parallel, method, train settings): what each strategy is for
    "ddp": ("ddp", LoraConfig(r=4, targets=["q_proj", "v_proj"]), {"lr": 1e-2}),
    "fsdp": ("fsdp", FullConfig(), {"lr": 1e-3, "llrd_decay": 0.8}),
    "fsdp-unfreezing": ("fsdp", FullConfig(unfreeze_every=1), {"lr": 1e-3, "grad_checkpointing": True}),
}


def _config(model_dir: Path, data: Path, grad_accum: int, case: str, save_every: int = 0) -> RunConfig:
    parallel, method, train = CASES[case]
    return RunConfig(
        model=str(model_dir),
        method=method,
        train=TrainConfig(max_steps=3, batch_size=3, grad_accum=grad_accum, max_len=64, device="cpu",
                          scheduler="linear", weight_decay=0.01, seed=3, parallel=parallel, save_every=save_every,
                          **train),
        data=DataConfig(path=str(data), val_count=3),
    )


def _torchrun(run_dir: Path, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "core", "train", "--config", str(run_dir / "config.yaml"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-6000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, case, monkeypatch):
    import core.forward

    # the one process runs each row whole, as the ranks do (it would otherwise run the shared system prompt once
    # per micro-batch: equal up to float summation order, core.forward.SharedPrefix)
    monkeypatch.setattr(core.forward, "PREFIX_MIN", 10**6)
    parallel = CASES[case][0]
    model_dir = save_tiny_lm(tmp_path / "model", init=0.5)
    data = write_qa(tmp_path / "qa.json", n=15)  # 12 train: 4 micro-batches of 3, a step takes 2

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    _config(model_dir, data, grad_accum=1, case=case).save(ddp_dir / "config.yaml")
    _torchrun(ddp_dir)

    model, tok = load_model(str(model_dir), device="cpu")
    single = list(train(_config(model_dir, data, grad_accum=2, case=case), tmp_path / "single", model=model,
                        tokenizer=tok))

    events = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("start") == 1  # only rank 0 writes
    assert events[0]["world_size"] == 2 and events[-1]["status"] == "completed"
    assert f"{parallel} over 2 processes" in (ddp_dir / "train.log").read_text()
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


def test_fsdp_checkpoints_hold_whole_tensors_and_resume_to_the_same_weights(tmp_path, monkeypatch):
    """An FSDP2 run's checkpoint equals one process's (parameters and AdamW moments, whole), and a run resumed
    from it under torchrun ends with the weights and losses of the uninterrupted run."""
    import core.forward

    monkeypatch.setattr(core.forward, "PREFIX_MIN", 10**6)  # the one process runs each row whole, as the ranks do
    model_dir = save_tiny_lm(tmp_path / "model", init=0.5)
    data = write_qa(tmp_path / "qa.json", n=15)
    run_dir = tmp_path / "fsdp"
    run_dir.mkdir()
    _config(model_dir, data, grad_accum=1, case="fsdp", save_every=1).save(run_dir / "config.yaml")
    _torchrun(run_dir)
    model, tok = load_model(str(model_dir), device="cpu")
    list(train(_config(model_dir, data, grad_accum=2, case="fsdp", save_every=1), tmp_path / "single", model=model,
               tokenizer=tok))

    def checkpoint(root: Path, step: int) -> tuple[dict, dict]:
        folder = root / "checkpoints" / f"step-{step}"
        return load_file(str(folder / "trainable.safetensors")), torch.load(folder / "optimizer.pt")

    (sharded, opt_sharded), (one, opt_one) = checkpoint(run_dir, 2), checkpoint(tmp_path / "single", 2)
    assert sharded.keys() == one.keys() and len(one) > 10
    for k in one:
        torch.testing.assert_close(sharded[k], one[k], rtol=1e-4, atol=1e-6)
    assert opt_sharded["state"].keys() == opt_one["state"].keys()
    for i, moments in opt_one["state"].items():
        assert not any(type(v).__name__ == "DTensor" for v in opt_sharded["state"][i].values())
        torch.testing.assert_close(opt_sharded["state"][i]["exp_avg_sq"], moments["exp_avg_sq"], rtol=1e-3, atol=1e-9)

    first = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in x
              and json.loads(x)["type"] == "step"]
    shutil.rmtree(run_dir / "checkpoints" / "step-3")  # back to step 2, and run step 3 again from there
    _torchrun(run_dir, "--resume")
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["resumed_from"] for e in events if e["type"] == "start"][-1] == 2
    assert [e["loss"] for e in events if e["type"] == "step"] == losses and events[-1]["status"] == "completed"
    again = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=0)


def test_auto_shards_only_a_method_that_trains_the_base_and_does_not_fit_one_device(monkeypatch):
    import core.dist as dist

    two, cpu = DistInfo(rank=0, world_size=2), torch.device("cpu")
    full, lora = build_method(FullConfig()), build_method(LoraConfig())
    monkeypatch.setattr(dist, "device_memory", lambda device, info: 16 * 10**9)
    assert strategy("auto", full, 10**9, cpu, two) == "fsdp"  # 16 GB of training state > half of 16 GB
    assert strategy("auto", full, 10**8, cpu, two) == "ddp"
    assert strategy("auto", lora, 10**9, cpu, two) == "ddp"  # its own small tensors: nothing to shard
    assert strategy("ddp", full, 10**9, cpu, two) == "ddp"
    assert strategy("fsdp", full, 10, cpu, DistInfo()) == "single"  # one process


def test_fsdp_refuses_a_method_that_does_not_train_the_base(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model")
    cfg = RunConfig(model=str(model_dir), method=LoraConfig(r=4), train=TrainConfig(parallel="fsdp"),
                    data=DataConfig(path="x.json"))
    with pytest.raises(ValueError, match="TrainConfig.parallel = 'fsdp' is invalid: .* not lora"):
        preflight(cfg)
