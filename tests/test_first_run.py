"""The time estimate (steps and FLOPs, checked against the engine and torch's FLOP counter) and the CPU first-run
suggestion of the Train form."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import DataConfig, TrainConfig
from core.forward import SharedPrefix, supervised_loss
from core.methods import build_method
from core.methods.lora import LoraConfig
from core.preflight import dry_run
from studio import actions, estimate, first_run
from studio.context import StudioContext

from test_train import run, run_config, write_qa
from tiny import tiny_llama


@pytest.mark.parametrize("kw", [dict(epochs=1.0, batch_size=4), dict(epochs=2.5, batch_size=3, grad_accum=2),
                                dict(max_steps=7)])
@pytest.mark.parametrize("val", [dict(val_fraction=0.25), dict(val_count=3), dict(val_fraction=0.0)])
def test_planned_steps_equal_the_steps_the_engine_takes(tmp_path, kw, val):
    data = write_qa(tmp_path / "qa.json", n=14)
    cfg = run_config(data, **{"max_steps": 0, **kw})
    cfg.data = DataConfig(path=str(data), **val)
    start = run(cfg, tmp_path / "run")[0]
    assert start["type"] == "start"
    assert estimate.planned_steps(cfg.train, estimate.train_rows(14, cfg.data)) == start["total_steps"]


@pytest.mark.parametrize("shared", [0, 16])
@pytest.mark.parametrize("method", [LoraConfig(r=4, targets=["all-linear"]), None])
def test_step_flops_match_torchs_flop_counter(method, shared):
    """The estimate's FLOPs of one forward + backward equal what torch counts on the real model within 10%
    (attention scores, which the estimate leaves out, are the difference at this length), also when the rows'
    shared prefix runs once (core.forward.SharedPrefix: its tokens count once)."""
    model = tiny_llama(layers=4)
    model.requires_grad_(False)
    if method is None:  # full fine-tuning: every weight trains
        model.requires_grad_(True)
        m = None
    else:
        torch.manual_seed(0)
        m = build_method(method)
        m.apply(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) + (trainable if m else 0)
    b, t = 4, 48
    ids = torch.randint(0, model.config.vocab_size, (b, t))
    ids[:, :shared] = ids[0, :shared]
    labels = ids.clone()
    labels[:, : t // 2] = -100  # half the positions supervised
    with FlopCounterMode(display=False) as counter:
        if shared:
            prefix = SharedPrefix(model, m, ids[:1, :shared])
            s, n = supervised_loss(model, m, ids[:, shared:], None, labels[:, shared:], prefix=prefix)
            (s / n).backward()
            prefix.backward()
        else:
            s, n = supervised_loss(model, m, ids, None, labels)
            (s / n).backward()
    shape = dry_run(model.config, method or LoraConfig()).shape
    supervised = int((labels[:, 1:] != -100).sum())
    ours = estimate.step_flops(shape, total, trainable, b * t - (b - 1) * shared, supervised)
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.10)


@pytest.fixture
def ctx(tmp_path, tiny_model_dir):
    c = StudioContext.create(tmp_path / "data", default_model=tiny_model_dir, start_jobs=False)
    yield c
    c.close()


def rate(monkeypatch, flops_per_s):
    monkeypatch.setattr(estimate, "matmul_rate", lambda device, precision: flops_per_s)


def test_cpu_first_run_fits_the_budget_and_the_data(ctx, monkeypatch):
    ds = actions.use_sample(ctx, "identity_sample.json")
    form = actions.form_defaults()
    train_rows = estimate.train_rows(ds["stats"]["n"], DataConfig())
    one_epoch = -(-train_rows // first_run.CPU_FORM["train.batch_size"])
    rate(monkeypatch, 1e15)  # a fast machine: one epoch fits the budget, and the run stops there
    assert first_run.suggest(ctx, form, ds, "cpu")["values"]["train.max_steps"] == one_epoch
    rate(monkeypatch, 1e6)  # a very slow one: the minimum that learns something
    assert first_run.suggest(ctx, form, ds, "cpu")["values"]["train.max_steps"] == first_run.MIN_STEPS
    rate(monkeypatch, 1.0)
    per_step_at_1 = first_run.suggest(ctx, form, ds, "cpu")["estimate"]["train_seconds"] / first_run.MIN_STEPS
    rate(monkeypatch, per_step_at_1 * 40.5 / first_run.TRAIN_BUDGET_S)  # in between: 40 steps fit the budget
    tip = first_run.suggest(ctx, form, ds, "cpu")
    steps = tip["values"]["train.max_steps"]
    assert steps == 40 < one_epoch
    per_step = tip["estimate"]["train_seconds"] / steps
    assert steps * per_step <= first_run.TRAIN_BUDGET_S < (steps + 1) * per_step
    # the values build the run the user sees: LoRA r 16 on every linear layer, and it checks
    cfg = actions.build_config({**form, **tip["values"], "data.path": ds["path"]}, default_model=ctx.default_model)
    assert (cfg.method.r, cfg.method.targets, cfg.train.lr, cfg.train.max_steps) == (16, ["all-linear"], 2e-3, steps)
    assert "First run on this CPU" in first_run.markdown(tip) and "Training ≈" in first_run.markdown(tip)


def test_no_first_run_suggestion_on_a_gpu_or_without_data(ctx):
    ds = actions.use_sample(ctx, "identity_sample.json")
    assert first_run.suggest(ctx, actions.form_defaults(), ds, "small_gpu") is None
    assert first_run.suggest(ctx, actions.form_defaults(), None, "cpu") is None


def test_the_suggestion_never_overwrites_what_the_user_chose(ctx, monkeypatch):
    rate(monkeypatch, 2e9)
    ds = actions.use_sample(ctx, "identity_sample.json")
    fresh = actions.form_defaults()
    assert first_run.untouched(fresh)
    tip = first_run.suggest(ctx, fresh, ds, "cpu")["values"]
    assert first_run.untouched({**fresh, **tip}, tip)  # a second dataset re-sizes the first suggestion
    assert not first_run.untouched({**fresh, **tip, "train.lr": 5e-4}, tip)
    assert not first_run.untouched({**fresh, "train.max_steps": 40})
    assert not first_run.untouched({**fresh, "method": "prefix_tuning"})


def test_time_estimate_needs_a_dataset(ctx):
    no_data = actions.check(ctx, {**actions.form_defaults(), "method": "lora"})
    assert no_data["train_seconds"] is None and "Training ≈" not in no_data["markdown"]
    ds = actions.use_sample(ctx, "identity_sample.json")
    with_data = actions.check(ctx, {**actions.form_defaults(), "method": "lora"}, ds)
    assert with_data["steps"] == estimate.planned_steps(TrainConfig(), estimate.train_rows(ds["stats"]["n"],
                                                                                           DataConfig()))
    assert with_data["train_seconds"] > 0 and "Training ≈" in with_data["markdown"]
    json.dumps(with_data)  # the API returns it as it is
