import pytest
import torch

from core.blocks import depth_map
from core.checkpoint import load_adapter
from core.config import method_config
from core.methods.full import FullConfig
from core.forward import logits, supervised_loss
from core.methods import build_method
from core.schedules import apply_unfreezing, lr_multiplier, param_groups
from tiny import (
    assert_bake_round_trip, assert_toggle_restores, batch, examples, greedy, saved_logits, tiny_llama, tiny_qwen2,
)

#: settings of the shared contract checks (tests/test_contract.py, tests/test_generate.py; see tiny.contract)
CONTRACT = {"lr": 3e-3, "steps": 40, "accuracy": 0.9, "measured": 0.99}


def train(model, method, steps, lr=3e-3, weight_decay=0.1, decay=1.0, on_step=None):
    """The training loop contract, written out: groups, unfreezing, schedule, step, after_step. Returns losses."""
    ids = examples()
    mask = torch.ones_like(ids)
    L = len([d for d in set(depth_map(model).values()) if d is not None and d >= 0]) - 1
    groups = param_groups(model, method.trainable_parameters(model), lr, decay, weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr)
    losses = []
    for step in range(steps):
        apply_unfreezing(opt.param_groups, method.frozen_below(step, 0, L))
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_multiplier(step, steps, 0, "constant")
        loss_sum, n = supervised_loss(model, method, ids, mask, ids)
        loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model)
        losses.append(loss.item())
        if on_step:
            on_step(step)
    model.requires_grad_(False)
    return losses


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def block_size(cfg):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q,o + k,v + gate,up,down + two RMSNorms


def test_trainable_counts_match_closed_form():
    model = tiny_llama(layers=3)
    m = build_method(FullConfig())
    m.apply(model)
    trainable, total = m.parameter_counts(model)
    cfg = model.config
    vocab_d = cfg.vocab_size * cfg.hidden_size
    assert trainable == total == vocab_d + 3 * block_size(cfg) + cfg.hidden_size  # tied head counted once
    m.remove(model)

    # freeze bottom block + every norm (substring 'norm' hits input_layernorm, post_attention_layernorm, model.norm)
    m = build_method(FullConfig(freeze_bottom=1, freeze_modules=["norm"]))
    m.apply(model)
    expected = vocab_d + 2 * (block_size(cfg) - 2 * cfg.hidden_size)
    assert m.parameter_counts(model)[0] == expected

    # untied head: freezing the embeddings leaves the head training
    model = tiny_qwen2()
    m = build_method(FullConfig(freeze_embeddings=True))
    m.apply(model)
    assert "lm_head.weight" in m.trainable_parameters(model)
    assert "model.embed_tokens.weight" not in m.trainable_parameters(model)


def test_tied_head_follows_the_embeddings():
    model = tiny_llama()
    m = build_method(FullConfig(freeze_modules=["lm_head"]))
    m.apply(model)  # lm_head is the embedding matrix: matched through its alias, frozen with it
    assert "model.embed_tokens.weight" not in m.trainable_parameters(model)


def test_frozen_bit_identical_after_adamw_with_weight_decay():
    model = tiny_qwen2(layers=2)
    m = build_method(FullConfig(freeze_embeddings=True, freeze_bottom=1))
    m.apply(model)
    before = snapshot(model)
    train(model, m, steps=3, weight_decay=0.1)
    depths = depth_map(model)
    frozen = {n for n, d in depths.items() if d in (-1, 0)}
    assert changed(model, before) == set(depths) - frozen


def test_gradual_unfreezing_plan_and_combined_with_freeze_bottom():
    m = build_method(FullConfig(unfreeze_every=2))
    assert [m.frozen_below(s, 0, 3) for s in range(8)] == [2, 2, 1, 1, 0, 0, -1, -1]
    e = build_method(FullConfig(unfreeze_every=1, unfreeze_unit="epochs"))
    assert [e.frozen_below(100, ep, 3) for ep in range(5)] == [2, 1, 0, -1, -1]
    assert build_method(FullConfig()).frozen_below(5, 0, 3) is None

    # freeze_bottom=1 + unfreeze one block per step on 3 blocks, AdamW with weight decay
    model = tiny_llama(layers=3)
    m = build_method(FullConfig(freeze_bottom=1, unfreeze_every=1))
    m.apply(model)
    depths = depth_map(model)
    before = snapshot(model)
    seen = []
    record = lambda step: seen.append({depths[n] for n in changed(model, before)})  # noqa: E731
    train(model, m, steps=4, weight_decay=0.1, on_step=record)
    assert seen == [{2, 3}, {1, 2, 3}, {1, 2, 3}, {-1, 1, 2, 3}]  # block 0 never: statically frozen


def test_save_load_gives_identical_logits(tmp_path):
    model = tiny_llama()
    m = build_method(FullConfig(freeze_bottom=1))
    m.apply(model)
    train(model, m, steps=3)
    ids, mask, want = saved_logits(model, m, tmp_path / "full")

    fresh = tiny_llama()
    base = logits(fresh, None, ids, mask)
    loaded = load_adapter(fresh, tmp_path / "full")
    assert torch.equal(logits(fresh, loaded, ids, mask), want)
    assert not torch.equal(base, want)


def test_bake_then_from_pretrained(tmp_path):
    model = tiny_llama()
    m = build_method(FullConfig())
    m.apply(model)
    train(model, m, steps=2)
    assert_bake_round_trip(model, m, tmp_path / "hf")


def test_loss_falls_disable_restores_base_and_generation_runs():
    torch.manual_seed(0)
    model = tiny_llama()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    m = build_method(FullConfig())
    m.apply(model)
    losses = train(model, m, steps=40, lr=1e-2, decay=0.8)
    assert losses[-1] < 0.5 * losses[0]
    tuned = logits(model, m, ids, mask)

    assert_toggle_restores(model, m, ids, mask, base, tuned)

    # greedy generation: the model reproduces a memorised training example from its first tokens
    seq = greedy(model, m, examples()[:1, :4], new_tokens=8)
    assert seq.shape == (1, 12)
    assert (seq[0, 4:] == examples()[0, 4:]).float().mean() > 0.5

    m.remove(model)
    assert torch.equal(logits(model, None, ids, mask), base)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: FullConfig(freeze_bottom=-1), "freeze_bottom"),
        (lambda: FullConfig(unfreeze_every=-2), "unfreeze_every"),
        (lambda: method_config("full", {"unfreeze_unit": "months"}), "unfreeze_unit"),
        (lambda: build_method(FullConfig(freeze_bottom=4)).apply(tiny_llama(layers=3)), "freeze_bottom"),
        (lambda: build_method(FullConfig(freeze_modules=["nope"])).apply(tiny_llama()), "freeze_modules"),
        (lambda: build_method(FullConfig(freeze_modules=[""])).apply(tiny_llama()), "freeze_modules"),
        (lambda: build_method(FullConfig(freeze_modules=["model"])).apply(tiny_llama()), "trains no parameter"),
    ],
)
def test_bad_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
