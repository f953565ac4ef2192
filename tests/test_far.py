"""FAR (core/methods/far.py) on the tiny Llama, Qwen2 and GPT-2 models."""

import math

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import ADAPTER_WEIGHTS, load_adapter
from core.config import method_config
from core.forward import logits, supervised_loss
from core.methods import build_method, spec
from core.methods.base import RunPlan
from core.methods.far import FarConfig, SplitLinear, find_ffns, learner_count
from core.preflight import dry_run
from core.schedules import param_groups
from tiny import (
    TINY_MODELS, assert_bake_round_trip, assert_greedy_runs, assert_toggle_restores, batch, overfit_data,
    saved_logits, sharpened,
)

#: for the generic checks of tests/test_contract.py: overfitting the 8 examples of tiny.overfit_data
#: (only FFN units train: attention, norms and the head stay frozen, so it needs half the units and 300 steps)
CONTRACT = {
    "config": {"retention": 0.5, "priming_fraction": 0.1},
    "lr": 5e-3,
    "steps": 300,
    "accuracy": 0.9,
    "measured": "token accuracy on tiny.sharpened: llama 0.966, qwen2 0.955, gpt2 0.989 (lr 1e-2, 200 steps: "
                "0.955 / 0.932 / 0.977; retention 0.1, 100 steps: 0.77 / - / 0.90)",
}

KINDS = ["llama", "qwen2", "gpt2"]


def batches(n=4):
    """n (input_ids, attention_mask, labels) batches of 2 sequences from tiny.overfit_data (cycled past 4)."""
    ids, mask, labels = overfit_data()
    return [(ids[j : j + 2], mask[j : j + 2], labels[j : j + 2]) for j in ((2 * i) % 8 for i in range(n))]


def loss_fn(model, method):
    def fn(b):
        loss_sum, n = supervised_loss(model, method, *b)
        return loss_sum / n

    return fn


def prepared(model, retention=0.1, total_steps=20, lr=1e-2, weight_decay=0.0, n_batches=4):
    m = build_method(FarConfig(retention=retention))
    m.apply(model)
    m.prepare(model, iter(batches(n_batches)), loss_fn(model, m), RunPlan(total_steps, lr, weight_decay))
    return m


def train(model, method, steps, lr=1e-2, weight_decay=0.1):
    """The loop contract: AdamW over param_groups of the trainable parameters, after_step after every step."""
    opt = torch.optim.AdamW(param_groups(model, method.trainable_parameters(model), lr, 1.0, weight_decay), lr=lr)
    for _ in range(steps):
        for b in batches(4):
            loss_fn(model, method)(b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step(model)


def unit_tensors(model):
    """{name: tensor} of every FFN weight/bias holding unit entries, from a merged (original-layout) model."""
    out = {}
    for f in find_ffns(model):
        for key, m, pname, axis in f.unit_tensors():
            out[f"{f.path}.{key}"] = (getattr(m, pname).detach().clone(), axis)
    return out


def closed_form(kind, model, retention):
    """Learner count by hand: k = ⌊retention·h⌋ units per block, 3·d entries per SwiGLU unit, 2·d + 1 for GPT-2."""
    cfg = model.config
    d = cfg.hidden_size
    h = getattr(cfg, "intermediate_size", None) or 4 * d
    per_unit = 2 * d + 1 if kind == "gpt2" else 3 * d
    return cfg.num_hidden_layers * max(1, int(retention * h)) * per_unit


# ---- counts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("retention", [0.1, 0.25, 1.0])
def test_learner_count_is_the_closed_form_before_and_after_prepare(kind, retention):
    model = TINY_MODELS[kind]()
    total = sum(p.numel() for p in model.parameters())
    m = build_method(FarConfig(retention=retention))
    m.apply(model)
    want = closed_form(kind, model, retention)
    assert m.parameter_counts(model) == (want, total)
    assert m.expected_trainable(model) == want
    m.prepare(model, iter(batches(2)), loss_fn(model, m), RunPlan(10, 1e-2))
    assert m.parameter_counts(model) == (want, total) and m.expected_trainable(model) == want
    h = 64 if kind != "gpt2" else 128
    assert all(len(f.learners) == learner_count(h, retention) == max(1, int(retention * h)) for f in m._ffns)


def test_dry_run_on_the_meta_device_gives_the_closed_form():
    model = TINY_MODELS["llama"]()
    run = dry_run(model.config, FarConfig(retention=0.25))
    assert run.trainable == closed_form("llama", model, 0.25)
    assert all(p.is_meta for p in run.model.parameters())


def test_bad_knobs_name_the_field():
    with pytest.raises(ValueError, match=r"FarConfig\.retention = 0"):
        FarConfig(retention=0.0)
    with pytest.raises(ValueError, match=r"FarConfig\.retention = 1\.5"):
        method_config("far", {"retention": 1.5})
    with pytest.raises(ValueError, match=r"FarConfig\.priming_fraction"):
        method_config("far", {"priming_fraction": "lots"})
    with pytest.raises(ValueError, match=r"FarConfig\.priming_fraction = 0"):
        FarConfig(priming_fraction=0)


def test_registered_with_its_flags():
    s = spec("far")
    assert s.family == "selective" and s.trains_base and s.prepares and s.can_merge and "quick" in s.goals


# ---- priming and selection ----------------------------------------------------------------------------------


def test_priming_picks_the_units_that_moved():
    """A loss that only touches chosen gate_proj rows moves only those units: exactly they become the learners."""
    model = TINY_MODELS["llama"]()
    m = build_method(FarConfig(retention=0.1))  # k = 6 of 64
    m.apply(model)
    chosen = [[3, 9, 17, 40, 41, 63], [0, 1, 2, 30, 50, 62], [5, 6, 7, 8, 9, 10]]

    def fake_loss(_batch):
        return sum((layer.mlp.gate_proj.weight[rows] ** 2).sum() for layer, rows in zip(model.model.layers, chosen))

    m.prepare(model, iter(batches(1)), fake_loss, RunPlan(total_steps=30, lr=1e-2))
    assert m.priming_steps_done == 3  # ⌈0.1 · 30⌉, cycling the one batch
    assert [f.learners.tolist() for f in m._ffns] == chosen


def test_prepare_is_deterministic_and_runs_once():
    a, b = TINY_MODELS["gpt2"](), TINY_MODELS["gpt2"]()
    ma, mb = prepared(a), prepared(b)
    ta, tb = ma.adapter_tensors(a), mb.adapter_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(f.learners, torch.arange(len(f.learners))) for f in ma._ffns)  # priming chose
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    ma.prepare(a, iter(batches(2)), loss_fn(a, ma), RunPlan(20, 1e-2))  # no-op now
    assert all(torch.equal(p, before[n]) for n, p in a.named_parameters())


def test_only_learner_parts_get_weight_gradients():
    model = TINY_MODELS["llama"]()
    m = prepared(model)
    loss_fn(model, m)(batches(1)[0]).backward()
    splits = [mod for mod in model.modules() if isinstance(mod, SplitLinear)]
    assert len(splits) == 9
    for s in splits:
        assert s.learn_weight.grad is not None and s.learn_weight.grad.abs().sum() > 0
        assert s.frozen_weight.grad is None and not s.frozen_weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(m.trainable_parameters(model))
    assert all(n.endswith("learn_weight") for n in m.trainable_parameters(model))


# ---- frozen units, merge, enable, bake ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_non_learner_units_stay_bit_identical_after_training_with_weight_decay(kind):
    model = TINY_MODELS[kind]()
    theta0 = unit_tensors(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = prepared(model, lr=1e-2, weight_decay=0.1)
    train(model, m, steps=3, lr=1e-2, weight_decay=0.1)
    m.merge(model)
    now = unit_tensors(model)
    for f in m._ffns:
        others = f.others()
        for key, *_ in f.unit_tensors():
            (w0, axis), (w, _) = theta0[f"{f.path}.{key}"], now[f"{f.path}.{key}"]
            assert torch.equal(w.index_select(axis, others), w0.index_select(axis, others)), key
            assert not torch.equal(w.index_select(axis, f.learners), w0.index_select(axis, f.learners)), key
    for n, p in model.named_parameters():  # attention, norms, embeddings, GPT-2's c_proj bias: untouched
        if n not in now:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("kind", KINDS)
def test_reconfigured_forward_equals_merged_and_disabled_is_base(kind):
    model = TINY_MODELS[kind]()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    m = prepared(model)
    train(model, m, steps=2)
    split = logits(model, m, ids, mask)
    assert (split - base).abs().max() > 1e-3  # non-zero deltas
    m.merge(model)
    assert not any(isinstance(mod, SplitLinear) for mod in model.modules())
    merged = logits(model, m, ids, mask)
    torch.testing.assert_close(merged, split, rtol=1e-5, atol=1e-5)  # split sums the down projection in two parts
    m.unmerge(model)
    assert torch.equal(logits(model, m, ids, mask), split)
    assert_toggle_restores(model, m, ids, mask, base, split)
    m.merge(model)
    assert_toggle_restores(model, m, ids, mask, base, merged)
    m.remove(model)
    assert torch.equal(logits(model, None, ids, mask), base)


def test_training_continues_across_merge_and_unmerge():
    """The trainable Parameter objects survive merge/unmerge, so an optimiser built before keeps training them."""
    model = TINY_MODELS["qwen2"]()
    m = prepared(model)
    params = dict(m.trainable_parameters(model))
    m.merge(model)
    m.unmerge(model)
    assert all(p is params[n] for n, p in m.trainable_parameters(model).items())


@pytest.mark.parametrize("kind", KINDS)
def test_bake_gives_a_plain_hf_folder_with_the_same_logits(kind, tmp_path):
    model = TINY_MODELS[kind]()
    ids, mask = batch()
    m = prepared(model)
    train(model, m, steps=2)
    split = logits(model, m, ids, mask)
    m.merge(model)  # bake == unbaked bit for bit from the merged layout; the split one agrees to rounding
    assert_bake_round_trip(model, m, tmp_path / "baked")
    torch.testing.assert_close(logits(model, None, ids, mask), split, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


# ---- save / load ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_identical_logits(kind, tmp_path):
    model = TINY_MODELS[kind]()
    m = prepared(model)
    train(model, m, steps=2)
    ids, mask, want = saved_logits(model, m, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    f = m._ffns[0]
    k, d = len(f.learners), model.config.hidden_size
    assert torch.equal(tensors[f"{f.path}.learners"], f.learners)
    if kind == "gpt2":
        assert tensors[f"{f.path}.c_fc.weight.units"].shape == (d, k)
        assert tensors[f"{f.path}.c_fc.bias.units"].shape == (k,)
        assert tensors[f"{f.path}.c_proj.weight.units"].shape == (k, d)
    else:
        assert tensors[f"{f.path}.gate_proj.weight.units"].shape == (k, d)
        assert tensors[f"{f.path}.down_proj.weight.units"].shape == (d, k)
    fresh = TINY_MODELS[kind]()
    loaded = load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, loaded, ids, mask), want)
    assert loaded.selected_by == "loaded"
    assert_greedy_runs(fresh, loaded, ids)
    base = logits(TINY_MODELS[kind](), None, ids, mask)
    assert_toggle_restores(fresh, loaded, ids, mask, base, want)


def test_load_refuses_bad_tensors(tmp_path):
    model = TINY_MODELS["llama"]()
    m = prepared(model)
    tensors = m.adapter_tensors(model)
    key = f"{m._ffns[0].path}.learners"
    fresh = TINY_MODELS["llama"]()
    mf = build_method(FarConfig())
    mf.apply(fresh)
    with pytest.raises(ValueError, match="shape"):
        mf.load_adapter_tensors(fresh, {**tensors, key: tensors[key][:-1]})
    with pytest.raises(ValueError, match="ascending"):
        mf.load_adapter_tensors(fresh, {**tensors, key: tensors[key].flip(0)})
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        mf.load_adapter_tensors(fresh, {**tensors, key: tensors[key] + 64})


def test_overfits_eight_examples():
    cfg = CONTRACT
    accuracies = {}
    for kind in ["llama", "gpt2"]:  # qwen2 too in tests/test_contract.py
        torch.manual_seed(0)
        model = sharpened(kind)
        m = build_method(method_config("far", cfg["config"]))
        m.apply(model)
        m.prepare(model, iter(batches(4)), loss_fn(model, m), RunPlan(cfg["steps"], cfg["lr"]))
        ids, mask, labels = overfit_data()
        opt = torch.optim.AdamW(m.trainable_parameters(model).values(), lr=cfg["lr"])
        for _ in range(cfg["steps"]):
            loss_fn(model, m)((ids, mask, labels)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            pred = logits(model, m, ids, mask)[:, :-1].argmax(-1)
        accuracies[kind] = (pred == ids[:, 1:]).float().mean().item()
    assert min(accuracies.values()) >= cfg["accuracy"], accuracies


# ---- the training loop: resume --------------------------------------------------------------------------------


def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path):
    """Resume repeats the (deterministic) priming, so the checkpoint's learner tensors land on the same units."""
    from test_train import STOP_FILE, run, run_config, steps, write_qa

    data = write_qa(tmp_path / "qa.json", n=12)
    cfg = run_config(data, method=FarConfig(retention=0.25, priming_fraction=0.3), max_steps=6, lr=5e-3,
                     weight_decay=0.01, warmup_steps=1, scheduler="cosine")
    whole = run(cfg, tmp_path / "whole")

    def stop_after_3(e):
        if e["type"] == "step" and e["step"] == 3:
            (tmp_path / "split" / STOP_FILE).write_text("")

    first = run(cfg, tmp_path / "split", on_event=stop_after_3)
    assert first[-1]["status"] == "stopped"
    second = run(cfg, tmp_path / "split", resume=True)
    assert second[0]["resumed_from"] == 3 and second[-1]["status"] == "completed"
    assert [e["loss"] for e in steps(first) + steps(second)] == [e["loss"] for e in steps(whole)]
    ta = load_file(str(tmp_path / "whole" / "adapter" / ADAPTER_WEIGHTS))
    tb = load_file(str(tmp_path / "split" / "adapter" / ADAPTER_WEIGHTS))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert whole[0]["trainable"] == 2 * math.floor(0.25 * 64) * 3 * 32
