"""LoRA on the tiny llama (GQA), qwen2 (qkv bias) and gpt2 (Conv1D) models, including parity with peft."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.blocks import model_shape
from core.checkpoint import load_adapter
from core.methods.lora import LoraConfig
from core.forward import logits
from core.methods import build_method
from core.methods.lora import LoraLinear, LoraMethod
from tiny import (
    TINY_MODELS, assert_greedy_runs, batch, one_step, overfit, overfit_data, saved_logits, sharpened,
)

MODELS = sorted(TINY_MODELS)

#: settings of the shared contract checks (tests/test_contract.py, tests/test_generate.py; see tiny.contract)
CONTRACT = {"config": {"r": 4, "targets": ["all-linear"]},
            "lr": 1e-2, "steps": 40, "accuracy": 0.9, "measured": 0.99}


def linear_shapes(kind: str, model) -> list[tuple[int, int]]:
    """(in, out) of every linear inside one block, from the config alone."""
    s = model_shape(model)
    d, q = s.hidden_size, s.num_heads * s.head_dim
    if kind == "gpt2":
        return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    ff = model.config.intermediate_size
    return [(d, q), (d, s.kv_dim), (d, s.kv_dim), (q, d), (d, ff), (d, ff), (ff, d)]  # q k v o gate up down


def randomise_b(method: LoraMethod, model, seed: int = 5) -> None:
    """Non-zero B, so merge / parity tests cannot pass trivially."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers(model).values():
            layer.lora_B.weight.normal_(0, 0.2)


def applied(kind: str, **cfg) -> tuple[torch.nn.Module, LoraMethod]:
    model = TINY_MODELS[kind]()
    method = build_method(LoraConfig(**cfg))
    method.apply(model)
    return model, method


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_trainable_count_is_closed_form_and_matches_peft(kind):
    import peft

    r = 4
    model, method = applied(kind, r=r, targets=["all-linear"])
    expected = model_shape(model).num_layers * sum(r * (i + o) for i, o in linear_shapes(kind, model))
    assert method.parameter_counts(model)[0] == expected
    assert {n.rsplit(".", 2)[-2] for n in method.trainable_parameters(model)} == {"lora_A", "lora_B"}

    peft_config = peft.LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", fan_in_fan_out=kind == "gpt2")
    ref = peft.get_peft_model(TINY_MODELS[kind](), peft_config)
    assert ref.get_nb_trainable_parameters()[0] == expected


def test_default_targets_q_v_count():
    model, method = applied("llama", r=8)  # default targets: q_proj, v_proj
    s = model_shape(model)
    per_block = 8 * (s.hidden_size + s.num_heads * s.head_dim) + 8 * (s.hidden_size + s.kv_dim)
    assert method.parameter_counts(model)[0] == s.num_layers * per_block


def test_gpt2_fused_c_attn_is_a_target():
    model, method = applied("gpt2", r=2, targets=["c_attn"])
    layers = method.layers(model)
    assert list(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(layer.fan_in_fan_out for layer in layers.values())
    assert method.adapter_config(model)["fan_in_fan_out"] is True


@pytest.mark.parametrize("kind", MODELS)
def test_frozen_base_is_bit_identical_after_a_step(kind):
    model, method = applied(kind, r=4, targets=["all-linear"])
    frozen, trained, now = one_step(model, method)
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(now[n].grad is None for n in frozen)
    assert any(not torch.equal(now[n], v) for n, v in trained.items())  # the step did move the adapter


@pytest.mark.parametrize("kind", MODELS)
def test_loss_falls_when_overfitting_and_greedy_generation_runs(kind):
    torch.manual_seed(0)
    model = sharpened(kind)
    method = build_method(LoraConfig(r=8, alpha=16, targets=["all-linear"]))
    method.apply(model)
    losses = overfit(model, method, steps=30)  # eval mode: GPT-2's dropout would only add noise here
    assert losses[-1] < 0.5 * losses[0], losses  # 8 random sequences, mostly memorised
    ids, _, _ = overfit_data()
    assert_greedy_runs(model, method, ids)


@pytest.mark.parametrize("kind", MODELS)
def test_save_load_gives_identical_logits(kind, tmp_path):
    model, method = applied(kind, r=4, alpha=8, targets=["q_proj", "v_proj"] if kind != "gpt2" else ["c_attn", "c_fc"])
    overfit(model, method, steps=2)
    ids, mask, want = saved_logits(model, method, tmp_path / "a")

    fresh = TINY_MODELS[kind]()
    loaded = load_adapter(fresh, tmp_path / "a")
    assert isinstance(loaded, LoraMethod)
    assert torch.equal(logits(fresh, loaded, ids, mask), want)


@pytest.mark.parametrize("kind", MODELS)
def test_merge_unmerge_disable_remove(kind):
    model = TINY_MODELS[kind]()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method(LoraConfig(r=4, targets=["all-linear"]))
    method.apply(model)
    assert torch.equal(logits(model, method, ids, mask), base)  # B = 0: unchanged at init
    randomise_b(method, model)
    adapted = logits(model, method, ids, mask)
    assert not torch.allclose(adapted, base, atol=1e-3)

    method.merge(model)
    assert all(layer.merged for layer in method.layers(model).values())
    torch.testing.assert_close(logits(model, method, ids, mask), adapted, atol=1e-5, rtol=1e-5)
    method.unmerge(model)
    torch.testing.assert_close(logits(model, method, ids, mask), adapted, atol=1e-5, rtol=1e-5)

    method.set_enabled(model, False)  # close, not bit-equal: unmerge leaves float rounding in W0
    torch.testing.assert_close(logits(model, method, ids, mask), base, atol=1e-5, rtol=1e-5)
    method.set_enabled(model, True)
    torch.testing.assert_close(logits(model, method, ids, mask), adapted, atol=1e-5, rtol=1e-5)

    method.remove(model)
    assert not method.layers(model)
    now = dict(model.named_parameters())
    assert set(now) == set(base_weights)
    for n, v in base_weights.items():
        torch.testing.assert_close(now[n], v, atol=1e-6, rtol=0)


def test_disabled_is_exactly_the_base_output():
    model = TINY_MODELS["llama"]()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    method = build_method(LoraConfig(r=4, targets=["all-linear"]))
    method.apply(model)
    randomise_b(method, model)
    method.set_enabled(model, False)
    assert torch.equal(logits(model, method, ids, mask), base)


def test_merge_refuses_non_finite_weights():
    model, method = applied("llama", r=2)
    layer = next(iter(method.layers(model).values()))
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        method.merge(model)
    assert torch.equal(layer.base_layer.weight, before)
    assert not any(m.merged for m in method.layers(model).values())


@pytest.mark.parametrize("kind", MODELS)
def test_bake_then_save_pretrained_reloads_with_same_logits(kind, tmp_path):
    model, method = applied(kind, r=4, targets=["all-linear"], rslora=True)
    randomise_b(method, model)
    ids, mask = batch()
    want = logits(model, method, ids, mask)
    base_keys = set(TINY_MODELS[kind]().state_dict())

    method.bake(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    model.save_pretrained(tmp_path / "baked")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "baked").eval()
    torch.testing.assert_close(logits(reloaded, None, ids, mask), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, rslora", [("llama", False), ("llama", True), ("gpt2", False), ("qwen2", False)])
def test_peft_loads_our_folder_with_the_same_logits(kind, rslora, tmp_path):
    import peft

    model, method = applied(kind, r=4, alpha=8, targets=["all-linear"], rslora=rslora)
    randomise_b(method, model)
    ids, mask, ours = saved_logits(model, method, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is rslora
    assert config["fan_in_fan_out"] is (kind == "gpt2")

    ref = peft.PeftModel.from_pretrained(TINY_MODELS[kind](), tmp_path / "a").eval()
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, logits(TINY_MODELS[kind](), None, ids, mask), atol=1e-3)


@pytest.mark.parametrize(
    "kind, cfg, field, needle",
    [
        ("llama", {"targets": ["x_proj"]}, "LoraConfig.targets", "available: q_proj, k_proj, v_proj, o_proj"),
        ("gpt2", {"targets": ["q_proj"]}, "LoraConfig.targets", "available: c_attn, c_proj, c_fc"),
        ("llama", {"targets": []}, "LoraConfig.targets", "all-linear"),
        ("llama", {"r": 17, "targets": ["k_proj"]}, "LoraConfig.r", "min"),  # k_proj: 32 -> 16
    ],
)
def test_bad_configs_name_the_field(kind, cfg, field, needle):
    model = TINY_MODELS[kind]()
    method = build_method(LoraConfig(**cfg))
    with pytest.raises(ValueError, match=field) as e:
        method.apply(model)
    assert needle in str(e.value)
    assert not method.layers(model)  # nothing half-applied
