"""Bottleneck adapters (Houlsby / Pfeiffer / attention-only) on the tiny llama, qwen2 and gpt2 models."""

import json
import math

import pytest
import torch
from torch import nn

from core.blocks import model_shape
from core.checkpoint import load_adapter
from core.methods.adapter import AdapterConfig
from core.forward import logits
from core.methods import build_method
from core.methods.adapter import AdapterMethod
from tiny import (
    TINY_MODELS, VOCAB, assert_greedy_runs, batch, one_step, overfit, overfit_data, saved_logits, sharpened,
)

MODELS = sorted(TINY_MODELS)
ATTN = {"llama": "self_attn", "qwen2": "self_attn", "gpt2": "attn"}
BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}

#: settings of the shared contract checks (tests/test_contract.py, tests/test_generate.py; see tiny.contract)
CONTRACT = {"config": {"bottleneck": 8}, "lr": 2e-2, "steps": 50, "accuracy": 0.9, "measured": 0.97}


def randomise(method: AdapterMethod, model, seed: int = 5) -> None:
    """Non-zero W_up, so the adapters really change the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            p.normal_(0, 0.2)


def applied(kind: str, **cfg) -> tuple[nn.Module, AdapterMethod]:
    model = TINY_MODELS[kind]()
    method = build_method(AdapterConfig(**cfg))
    method.apply(model)
    return model, method


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement, per_block", [("houlsby", 2), ("pfeiffer", 1), ("attn", 1)])
@pytest.mark.parametrize("kind", MODELS)
def test_trainable_count_is_closed_form(kind, placement, per_block):
    b = 4
    model, method = applied(kind, bottleneck=b, placement=placement)
    s = model_shape(model)
    d = s.hidden_size
    assert method.parameter_counts(model)[0] == s.num_layers * per_block * (d * b + b + b * d + d)
    names = list(method.wrappers(model))
    assert len(names) == s.num_layers * per_block
    if placement != "attn":
        assert f"{BLOCKS[kind]}.0.mlp" in names
    if placement != "pfeiffer":
        assert f"{BLOCKS[kind]}.0.{ATTN[kind]}" in names


@pytest.mark.parametrize("kind", MODELS)
def test_identity_at_init_disabled_is_base_and_remove_restores(kind):
    model = TINY_MODELS[kind]()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method(AdapterConfig(bottleneck=4, activation="gelu"))
    method.apply(model)
    assert torch.equal(logits(model, method, ids, mask), base)  # W_up = 0, b_up = 0

    randomise(method, model)
    adapted = logits(model, method, ids, mask)
    assert not torch.allclose(adapted, base, atol=1e-3)
    method.set_enabled(model, False)
    assert torch.equal(logits(model, method, ids, mask), base)
    method.set_enabled(model, True)
    assert torch.equal(logits(model, method, ids, mask), adapted)

    method.remove(model)
    assert not method.wrappers(model)
    state = model.state_dict()
    assert set(state) == set(base_state) and all(torch.equal(state[k], v) for k, v in base_state.items())
    assert torch.equal(logits(model, None, ids, mask), base)


@pytest.mark.parametrize("kind", MODELS)
def test_frozen_base_is_bit_identical_after_a_step(kind):
    model, method = applied(kind, bottleneck=4)
    frozen, trained, now = one_step(model, method)
    assert all(torch.equal(now[n], v) and now[n].grad is None for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in trained.items())


@pytest.mark.parametrize("kind", MODELS)
def test_loss_falls_when_overfitting_and_greedy_generation_runs(kind):
    torch.manual_seed(0)
    model = sharpened(kind)
    method = build_method(AdapterConfig(bottleneck=16))
    method.apply(model)
    # 8 examples over a sub-vocabulary of 8 tokens: a bias or a bottleneck can learn that much in 30 steps
    losses = overfit(model, method, steps=30, vocab=9)
    assert losses[-1] < losses[0] - 1.0, losses  # measured: about -1.9
    assert losses[-1] < math.log(VOCAB) - 0.5, losses  # clearly better than a uniform guess (measured: ~3.8)
    ids, _, _ = overfit_data(vocab=9)
    assert_greedy_runs(model, method, ids)


@pytest.mark.parametrize("kind, placement", [("llama", "houlsby"), ("qwen2", "pfeiffer"), ("gpt2", "attn")])
def test_save_load_gives_identical_logits_and_documented_keys(kind, placement, tmp_path):
    model, method = applied(kind, bottleneck=4, placement=placement, activation="silu")
    overfit(model, method, steps=2)
    ids, mask, want = saved_logits(model, method, tmp_path / "a")

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["format"] == "peft_studio.bottleneck_adapter" and config["placement"] == placement
    keys = set(method.adapter_tensors(model))
    documented = {f"{m}.adapter.{p}.{t}" for m in config["modules"] for p in ("down", "up") for t in ("weight", "bias")}
    assert keys == documented

    fresh = TINY_MODELS[kind]()
    loaded = load_adapter(fresh, tmp_path / "a")
    assert isinstance(loaded, AdapterMethod)
    assert torch.equal(logits(fresh, loaded, ids, mask), want)


def test_cannot_merge_and_rejects_mismatched_tensors():
    model, method = applied("llama", bottleneck=4)
    assert AdapterMethod.can_merge is False
    with pytest.raises(NotImplementedError):
        method.merge(model)
    tensors = {k: v.detach().clone() for k, v in method.adapter_tensors(model).items()}
    tensors.popitem()
    with pytest.raises(ValueError, match="missing keys"):
        method.load_adapter_tensors(model, tensors)
    with pytest.raises(ValueError, match="already applied"):
        method.apply(model)


class _NoMlpBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Linear(8, 8)


class _NoMlpModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_NoMlpBlock(), _NoMlpBlock()])


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="sideways")
    with pytest.raises(ValueError, match="activation"):
        AdapterConfig(activation="swish")
    with pytest.raises(ValueError, match="bottleneck"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(ValueError, match="AdapterConfig.placement.*MLP"):
        AdapterMethod(AdapterConfig(placement="pfeiffer")).apply(_NoMlpModel())
