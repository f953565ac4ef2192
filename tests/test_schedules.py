import math

import pytest
import torch

from core.blocks import depth_map
from core.schedules import (
    apply_unfreezing,
    describe_groups,
    llrd_factor,
    lr_multiplier,
    param_groups,
    unfrozen_from,
)
from tiny import tiny_llama, tiny_qwen2


# ---- lr over time ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_is_linear_and_reaches_one(kind):
    assert lr_multiplier(0, 100, 10, kind) == pytest.approx(0.1)
    assert lr_multiplier(4, 100, 10, kind) == pytest.approx(0.5)
    assert lr_multiplier(9, 100, 10, kind) == 1.0  # warmup end
    assert lr_multiplier(10, 100, 10, kind) == 1.0  # first step after warmup
    assert lr_multiplier(0, 100, 0, kind) == 1.0  # no warmup: full lr at once


@pytest.mark.parametrize(
    "kind, mid, last, end",
    [
        ("constant", 1.0, 1.0, 1.0),
        ("linear", 0.5, 1 / 90, 0.0),
        ("cosine", 0.5, 0.5 * (1 + math.cos(math.pi * 89 / 90)), 0.0),
    ],
)
def test_schedule_midpoint_and_end(kind, mid, last, end):
    # warmup 10, total 100: decay runs over steps 10 .. 100, midpoint 55
    assert lr_multiplier(55, 100, 10, kind) == pytest.approx(mid)
    assert lr_multiplier(99, 100, 10, kind) == pytest.approx(last)  # the last step still moves
    assert lr_multiplier(100, 100, 10, kind) == pytest.approx(end)
    assert lr_multiplier(150, 100, 10, kind) == pytest.approx(end)


def test_decay_is_monotone():
    for kind in ("linear", "cosine"):
        values = [lr_multiplier(s, 50, 5, kind) for s in range(5, 51)]
        assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: lr_multiplier(0, 10, 0, "step"), "kind"),
        (lambda: lr_multiplier(0, 0, 0, "cosine"), "total_steps"),
        (lambda: lr_multiplier(0, 10, -1, "cosine"), "warmup_steps"),
        (lambda: lr_multiplier(-1, 10, 0, "cosine"), "step"),
        (lambda: llrd_factor(0, 3, 0.0), "decay"),
        (lambda: llrd_factor(0, 3, 1.2), "decay"),
        (lambda: unfrozen_from(0, 0, 3), "every"),
    ],
)
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ---- LLRD ------------------------------------------------------------------------------------------------------


def test_llrd_factor_formula():
    L, d = 3, 0.8
    assert [llrd_factor(l, L, d) for l in range(L)] == [d**2, d**1, d**0]
    assert llrd_factor(-1, L, d) == d**3  # embeddings: one step below block 0
    assert llrd_factor(L, L, d) == 1.0  # final norm + head
    assert llrd_factor(None, L, d) == 1.0  # method-owned
    assert llrd_factor(0, L, 1.0) == 1.0  # decay 1 = off


def test_llrd_param_groups_carry_exact_learning_rates():
    model = tiny_llama(layers=3)
    params = dict(model.named_parameters())
    lr, decay = 1e-3, 0.8
    groups = param_groups(model, params, lr, decay, weight_decay=0.0)

    assert [g["name"] for g in groups] == ["embed", "block 0", "block 1", "block 2", "head"]
    expected = {-1: lr * decay**3, 0: lr * decay**2, 1: lr * decay**1, 2: lr * decay**0, 3: lr}
    for g in groups:
        assert g["lr"] == g["initial_lr"] == expected[g["depth"]]
        assert g["weight_decay"] == 0.0
    # every parameter sits exactly once, in the group of its depth
    depths = depth_map(model)
    by_id = {id(p): g["depth"] for g in groups for p in g["params"]}
    assert len(by_id) == len(params) == sum(len(g["params"]) for g in groups)
    assert all(by_id[id(p)] == depths[n] for n, p in params.items())

    opt = torch.optim.AdamW(groups, lr=lr)  # the groups are accepted as they are
    assert [pg["lr"] for pg in opt.param_groups] == [expected[g["depth"]] for g in groups]
    assert "block 2" in describe_groups(groups)


def test_weight_decay_splits_biases_and_norms_off():
    model = tiny_qwen2(layers=2)  # has q/k/v biases
    params = dict(model.named_parameters())
    groups = param_groups(model, params, 1e-3, 0.9, weight_decay=0.1)
    for g in groups:
        dims = {p.ndim for p in g["params"]}
        if g["name"].endswith("(no decay)"):
            assert g["weight_decay"] == 0.0 and dims == {1}
        else:
            assert g["weight_decay"] == 0.1 and min(dims) >= 2
        assert g["initial_lr"] == 1e-3 * llrd_factor(g["depth"], 2, 0.9)
    names = [g["name"] for g in groups]
    assert "block 0 (no decay)" in names and "head (no decay)" in names
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_param_groups_reject_foreign_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match="params"):
        param_groups(model, {"not.a.param": torch.nn.Parameter(torch.zeros(1))}, 1e-3, 1.0, 0.0)


# ---- gradual unfreezing ----------------------------------------------------------------------------------------


def test_unfreezing_plan():
    # L = 3, one more block every 2 units: top block first, then downward, embeddings last
    assert [unfrozen_from(p, 2, 3) for p in range(9)] == [2, 2, 1, 1, 0, 0, -1, -1, -1]
    assert [unfrozen_from(p, 1, 1) for p in range(3)] == [0, -1, -1]


def test_apply_unfreezing_sets_requires_grad_by_depth():
    model = tiny_llama(layers=3)
    groups = param_groups(model, dict(model.named_parameters()), 1e-3, 1.0, 0.0)
    assert apply_unfreezing(groups, 2) == ["block 2", "head"]
    trains = {g["depth"]: all(p.requires_grad for p in g["params"]) for g in groups}
    assert trains == {-1: False, 0: False, 1: False, 2: True, 3: True}
    assert apply_unfreezing(groups, None) == ["embed", "block 0", "block 1", "block 2", "head"]
