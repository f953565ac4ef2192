import pytest
import torch
from safetensors.torch import load_file

from core.blocks import depth_map
from core.checkpoint import ADAPTER_WEIGHTS, load_adapter
from core.config import method_config
from core.methods.freeze import FreezeConfig
from core.forward import logits, supervised_loss
from core.methods import build_method
from core.schedules import apply_unfreezing, param_groups
from tiny import (
    VOCAB, assert_bake_round_trip, assert_toggle_restores, batch, examples, greedy, saved_logits, tiny_gpt2, tiny_llama,
    tiny_qwen2,
)

#: settings of the shared contract checks (tests/test_contract.py, tests/test_generate.py; see tiny.contract)
CONTRACT = {"lr": 3e-3, "steps": 50, "accuracy": 0.9, "measured": 0.99}


def train(model, method, steps, lr=1e-2, weight_decay=0.1):
    """The loop contract (see core.schedules) with a constant lr. Returns the losses."""
    ids = examples()
    opt = torch.optim.AdamW(param_groups(model, method.trainable_parameters(model), lr, 0.9, weight_decay), lr=lr)
    losses = []
    for step in range(steps):
        apply_unfreezing(opt.param_groups, method.frozen_below(step, 0, model.config.num_hidden_layers))
        loss_sum, n = supervised_loss(model, method, ids, torch.ones_like(ids), ids)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model)
        losses.append((loss_sum / n).item())
    model.requires_grad_(False)
    return losses


def test_trainable_count_top2_of_3_plus_norm_is_closed_form():
    model = tiny_llama(layers=3)
    m = build_method(FreezeConfig(top_n=2, extra_modules=["norm"]))
    m.apply(model)
    c = model.config
    d, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q,o + k,v + gate,up,down + two RMSNorms
    assert m.parameter_counts(model)[0] == 2 * block + d
    depths = depth_map(model)
    assert {depths[n] for n in m.trainable_parameters(model)} == {1, 2, 3}


def test_extra_modules_by_alias_on_every_layout():
    # untied head: lm_head adds exactly vocab x d
    model = tiny_qwen2(layers=2)
    m = build_method(FreezeConfig(top_n=1, extra_modules=[]))
    m.apply(model)
    n0 = m.parameter_counts(model)[0]
    m.remove(model)
    m = build_method(FreezeConfig(top_n=1, extra_modules=["lm_head"]))
    m.apply(model)
    assert m.parameter_counts(model)[0] == n0 + model.config.vocab_size * model.config.hidden_size
    # GPT-2 calls its final norm ln_f: 'norm' still finds it, and so does its own name
    for extra in (["norm"], ["ln_f"], ["transformer.ln_f"]):
        g = tiny_gpt2()
        m = build_method(FreezeConfig(top_n=1, extra_modules=extra))
        m.apply(g)
        assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= set(m.trainable_parameters(g))


def test_frozen_bit_identical_after_adamw_with_weight_decay():
    model = tiny_qwen2(layers=2)
    m = build_method(FreezeConfig(top_n=1, extra_modules=["norm"]))
    m.apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, m, steps=3, weight_decay=0.1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {"model.norm.weight"}
    assert changed == trained


def test_save_only_changed_tensors_and_load_identical_logits(tmp_path):
    model = tiny_llama()
    m = build_method(FreezeConfig(top_n=1))
    m.apply(model)
    train(model, m, steps=3)
    ids, mask, want = saved_logits(model, m, tmp_path / "freeze")
    saved = load_file(str(tmp_path / "freeze" / ADAPTER_WEIGHTS))
    top = {n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")}
    assert set(saved) == top | {"model.norm.weight"}  # the changed tensors only

    fresh = tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "freeze")
    assert torch.equal(logits(fresh, loaded, ids, mask), want)


def test_bake_then_from_pretrained(tmp_path):
    model = tiny_gpt2()
    m = build_method(FreezeConfig(top_n=1, extra_modules=["norm", "lm_head"]))
    m.apply(model)
    train(model, m, steps=2)
    assert_bake_round_trip(model, m, tmp_path / "hf")


def test_loss_falls_disable_restores_base_and_generation_runs():
    model = tiny_llama()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    m = build_method(FreezeConfig(top_n=2, extra_modules=["norm", "lm_head"]))  # tied: lm_head is the embedding
    m.apply(model)
    losses = train(model, m, steps=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]

    assert_toggle_restores(model, m, ids, mask, base)

    seq = greedy(model, m, ids[:1, :3], new_tokens=5)
    assert seq.shape == (1, 8) and int(seq.max()) < VOCAB

    m.remove(model)
    assert torch.equal(logits(model, None, ids, mask), base)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: FreezeConfig(top_n=0), "top_n"),
        (lambda: method_config("freeze", {"top_n": "two"}), "top_n"),
        (lambda: build_method(FreezeConfig(top_n=4)).apply(tiny_llama(layers=3)), "top_n"),
        (lambda: build_method(FreezeConfig(extra_modules=["ln_f"])).apply(tiny_llama()), "extra_modules.*available"),
    ],
)
def test_bad_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_unknown_extra_module_lists_the_available_names():
    with pytest.raises(ValueError, match="available: embed_tokens, lm_head, norm"):
        build_method(FreezeConfig(extra_modules=["ln_f"])).apply(tiny_llama())
