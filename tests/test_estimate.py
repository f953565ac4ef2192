"""The studio's peak-memory estimate (studio.estimate) against what the engine really holds while it trains.

The measure is tests/livebytes.py: every tensor storage alive at once, counted at the dispatcher, over setup, a
method's preparation (FishMask's Fisher pass, FAR's priming) and two optimiser steps. The estimate must be within
±30% of it: for every registered method on a tiny model (whose memory is mostly its 49k-entry vocabulary and the
chunked cross-entropy), and for LoRA and full fine-tuning on the default model (mostly weights, AdamW state and
activations)."""

from __future__ import annotations

import pytest
import torch

from core.config import DataConfig, RunConfig, TrainConfig
from core.data.load import load_examples, length_stats
from core.methods import specs
from core.train import train
from livebytes import LiveBytes
from studio.estimate import Estimator
from tiny import contract_config
from test_train import tiny_lm, tokenizer, write_qa

TOLERANCE = 0.30


def measured_and_estimated(cfg: RunConfig, model, tok, tmp_path) -> tuple[int, int]:
    with LiveBytes(model) as mem:
        for _ in train(cfg, tmp_path / "run", model=model, tokenizer=tok):
            pass
    examples, _ = load_examples(cfg.data, tok, cfg.train.max_len)
    stats = length_stats(examples)
    estimator = Estimator({cfg.model: model.config})
    est = estimator.estimate(cfg.model, cfg.method, cfg.train, stats["max"], "cpu", data=(stats, cfg.data))
    return mem.peak, est.peak_bytes


def test_the_tracker_counts_what_is_alive():
    with LiveBytes() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(2000, dtype=torch.float32)
        del a
        c = torch.empty(500, dtype=torch.float32)
        view = c[:10]  # a view adds no storage
    assert mem.peak == 12000 and b.numel() + view.numel()


@pytest.mark.parametrize("name", list(specs()))
def test_estimate_within_30_percent_on_a_tiny_model(name, tmp_path):
    torch.set_num_threads(1)
    data = write_qa(tmp_path / "qa.json", n=16)
    cfg = RunConfig(model="tiny", method=contract_config(name),
                    train=TrainConfig(max_steps=2, batch_size=8, max_len=64, log_every=1, eval_every=0),
                    data=DataConfig(path=str(data), val_fraction=0.0))
    measured, estimated = measured_and_estimated(cfg, tiny_lm(), tokenizer(), tmp_path)
    assert abs(estimated / measured - 1) <= TOLERANCE, (name, measured, estimated)


@pytest.mark.slow
@pytest.mark.parametrize("name, precision", [("lora", "fp32"), ("lora", "bf16-mixed"), ("full", "auto")])
def test_estimate_within_30_percent_on_the_default_model(name, precision, tmp_path):
    """bf16-mixed on a CPU also keeps core.attention's probabilities (9 heads · 128 keys a position, here)."""
    from pathlib import Path

    from core.config import DEFAULT_MODEL
    from core.methods import method_config
    from core.models import load_model, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    sample = Path(__file__).parent.parent / "assets" / "identity_sample.json"
    cfg = RunConfig(model=DEFAULT_MODEL, method=method_config(name),
                    train=TrainConfig(max_steps=2, batch_size=8, max_len=128, log_every=1, eval_every=0,
                                      precision=precision),
                    data=DataConfig(path=str(sample), val_fraction=0.0))
    measured, estimated = measured_and_estimated(cfg, load_model(DEFAULT_MODEL, tokenizer=tok)[0], tok, tmp_path)
    assert abs(estimated / measured - 1) <= TOLERANCE, (name, measured, estimated)


@pytest.mark.parametrize("name", ["lora", "full"])
def test_estimate_within_30_percent_under_bf16_mixed(name, tmp_path):
    """bf16 base weights, fp32 trainable tensors and AdamW state, bf16 activations (the path GPUs take)."""
    torch.set_num_threads(1)
    data = write_qa(tmp_path / "qa.json", n=16)
    cfg = RunConfig(model="tiny", method=contract_config(name),
                    train=TrainConfig(max_steps=2, batch_size=8, max_len=64, log_every=1, eval_every=0,
                                      precision="bf16-mixed"),
                    data=DataConfig(path=str(data), val_fraction=0.0))
    measured, estimated = measured_and_estimated(cfg, tiny_lm(), tokenizer(), tmp_path)
    assert abs(estimated / measured - 1) <= TOLERANCE, (name, measured, estimated)


def test_across_several_gpus_the_estimate_names_the_strategy_and_splits_what_fsdp_shards(monkeypatch):
    import core.dist as dist
    from core.methods import method_config

    config = tiny_lm().config
    train_cfg = TrainConfig(batch_size=8, max_len=64)
    estimator = Estimator({"tiny": config})
    one = estimator.estimate("tiny", method_config("full"), train_cfg, 64)
    monkeypatch.setattr(dist, "device_memory", lambda device, info: 10**12)  # fits: auto keeps whole copies
    ddp = estimator.estimate("tiny", method_config("full"), train_cfg, 64, world=4)
    assert ddp.parallel == "ddp" and ddp.peak_bytes == one.peak_bytes and "DDP" in ddp.markdown()
    monkeypatch.setattr(dist, "device_memory", lambda device, info: 10**6)  # does not fit one device
    fsdp = estimator.estimate("tiny", method_config("full"), train_cfg, 64, world=4)
    assert fsdp.parallel == "fsdp" and "FSDP2" in fsdp.markdown()
    assert fsdp.grads_bytes == one.grads_bytes // 4 and fsdp.optimizer_bytes == one.optimizer_bytes // 4
    assert fsdp.weights_bytes < one.weights_bytes / 2
    lora = estimator.estimate("tiny", method_config("lora"), train_cfg, 64, world=4)
    assert lora.parallel == "ddp"  # nothing of the base trains: nothing to shard


def test_the_time_estimate_counts_a_shared_prefix_once_per_micro_batch_and_every_micro_batch(monkeypatch):
    """A step's tokens: grad_accum micro-batches of batch_size rows, each running the dataset's shared prompt
    prefix once, in a call of its own, where the engine shares it (core.train.shares_prefix: not for virtual-token
    methods, nor under activation checkpointing)."""
    import studio.estimate as E
    from core.config import DataConfig
    from core.methods import method_config

    seen = []
    monkeypatch.setattr(E, "matmul_rate", lambda device, precision: 1.0)
    monkeypatch.setattr(E, "step_flops", lambda shape, total, trainable, tokens, supervised: seen.append(tokens) or 1.0)
    estimator = Estimator({"tiny": tiny_lm().config})
    stats = {"n": 100, "mean": 60.0, "supervised_tokens": 2000, "shared_prefix": 24}
    train_cfg = TrainConfig(batch_size=4, grad_accum=2, max_len=64)
    for method in ("lora", "prompt_tuning"):
        estimator.estimate("tiny", method_config(method), train_cfg, 64, data=(stats, DataConfig()))
    estimator.estimate("tiny", method_config("lora"), TrainConfig(batch_size=4, grad_accum=2, max_len=64,
                                                                 grad_checkpointing=True), 64, data=(stats, DataConfig()))
    virtual = method_config("prompt_tuning").num_virtual_tokens
    from core.forward import piece_budget

    call = piece_budget(torch.device("cpu"))[1]  # the prefix's own forward and backward
    assert seen == [8 * 60 - 6 * 24 + 2 * call, 8 * (60 + virtual), 8 * 60]


def test_training_time_counts_the_precision_s_share_of_the_matmul_rate(monkeypatch):
    """bf16 matmuls run several times their fp32 on bf16 hardware while the rest of a step does not: the time
    estimate divides by the rate measured in the run's precision times that precision's EFFICIENCY."""
    import studio.estimate as E
    from core.config import DataConfig
    from core.methods import method_config

    monkeypatch.setattr(E, "matmul_rate", lambda device, precision: {"fp32": 1e9, "bf16-mixed": 4e9}[precision])
    estimator = Estimator({"tiny": tiny_lm().config})
    stats = {"n": 100, "mean": 60.0, "supervised_tokens": 2000, "shared_prefix": 0}
    seconds = {p: estimator.estimate("tiny", method_config("lora"), TrainConfig(batch_size=4, max_len=64, precision=p),
                                     64, data=(stats, DataConfig())).train_seconds for p in ("fp32", "bf16-mixed")}
    ratio = (4e9 * E.EFFICIENCY["bf16-mixed"]) / (1e9 * E.EFFICIENCY["fp32"])
    assert seconds["fp32"] / seconds["bf16-mixed"] == pytest.approx(ratio)
    assert E.EFFICIENCY["bf16-mixed"] < E.EFFICIENCY["fp32"]
