import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import ADAPTER_WEIGHTS, load_adapter
from core.config import method_config
from core.methods.fishmask import FishMaskConfig
from core.forward import logits, supervised_loss
from core.methods import build_method
from core.methods.fishmask import FishMaskMethod
from core.schedules import param_groups
from tiny import (
    VOCAB, assert_bake_round_trip, assert_toggle_restores, batch, examples, greedy, saved_logits, tiny_gpt2, tiny_llama,
)

#: settings of the shared contract checks (tests/test_contract.py, tests/test_generate.py; see tiny.contract)
CONTRACT = {
    "config": {"keep_ratio": 0.05, "fisher_batches": 2}, "lr": 3e-2, "steps": 75, "accuracy": 0.9, "measured": 0.95,
}


def fisher_batches(n=4):
    ids = examples()
    return [ids[i * 2 : i * 2 + 2] for i in range(n)]


def loss_fn(model, method):
    def fn(ids):
        loss_sum, n = supervised_loss(model, method, ids, torch.ones_like(ids), ids)
        return loss_sum / n

    return fn


def prepared(model, keep_ratio=0.05, batches=4):
    m = build_method(FishMaskConfig(keep_ratio=keep_ratio, fisher_batches=batches))
    m.apply(model)
    m.prepare(model, fisher_batches(8), loss_fn(model, m))  # 8 offered, fisher_batches used
    return m


def train(model, method, steps, lr=1e-2, weight_decay=0.1, after_step=True):
    """The loop contract (see core.schedules): prepare happened already; after_step after every step."""
    ids = examples()
    opt = torch.optim.AdamW(param_groups(model, method.trainable_parameters(model), lr, 1.0, weight_decay), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, method)(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step:
            method.after_step(model)
        losses.append(loss.item())
    model.requires_grad_(False)
    return losses


def test_training_without_prepare_is_a_clear_error():
    model = tiny_llama()
    m = build_method(FishMaskConfig())
    m.apply(model)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="prepare"):
        m.trainable_parameters(model)
    with pytest.raises(RuntimeError, match="prepare"):
        m.after_step(model)


def test_mask_is_the_global_top_k_of_the_fisher():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())

    # reference: mean squared gradient over the first 4 batches, computed here by hand
    params = dict(model.named_parameters())
    model.requires_grad_(True)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids in fisher_batches(4):
        model.zero_grad()
        loss_fn(model, None)(ids).backward()
        for n, p in params.items():
            fisher[n] += p.grad.square() / 4
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)

    m = prepared(model, keep_ratio=0.05, batches=4)
    k = int(0.05 * total)
    assert m.fisher_batches_used == 4
    assert m.parameter_counts(model) == (k, total)  # closed form: k = floor(keep_ratio * total)
    kept = torch.cat([fisher[n][m._masks[n]] for n in m._masks])
    dropped = torch.cat([fisher[n][~m._masks[n]] if n in m._masks else fisher[n].flatten() for n in fisher])
    assert kept.numel() == k
    assert kept.min() >= dropped.max() * (1 - 1e-5)
    # requires_grad exactly on tensors with at least one kept entry
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(m._masks)
    assert set(m.trainable_parameters(model)) == set(m._masks)


def test_masked_out_entries_bit_identical_after_adamw_with_weight_decay():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = prepared(model, keep_ratio=0.05)
    train(model, m, steps=4, weight_decay=0.1)
    masks = m._masks
    moved_in_mask = 0
    for n, p in model.named_parameters():
        if n not in masks:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.equal(p[~masks[n]], before[n][~masks[n]]), n  # inside trained tensors too
            moved_in_mask += int((p[masks[n]] != before[n][masks[n]]).sum())
    assert moved_in_mask > 0.9 * m.parameter_counts(model)[0]


def test_without_after_step_weight_decay_would_leak():
    # the check above can fail: skipping after_step lets weight decay move masked-out entries
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = prepared(model)
    train(model, m, steps=2, weight_decay=0.1, after_step=False)
    n, mask = next(iter(m._masks.items()))
    assert not torch.equal(dict(model.named_parameters())[n][~mask], before[n][~mask])


def test_sparse_delta_save_load_identical_logits(tmp_path):
    model = tiny_llama()
    m = prepared(model)
    train(model, m, steps=3)
    ids, mask, want = saved_logits(model, m, tmp_path / "fm")

    saved = load_file(str(tmp_path / "fm" / ADAPTER_WEIGHTS))
    for n, kept in m._masks.items():
        idx, values = saved[n + ".indices"], saved[n + ".values"]
        assert idx.dtype == torch.int64 and torch.equal(idx, kept.flatten().nonzero().squeeze(1))
        assert torch.equal(values, dict(model.named_parameters())[n].flatten()[idx])
    assert len(saved) == 2 * len(m._masks)

    fresh = tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "fm")
    assert torch.equal(logits(fresh, loaded, ids, mask), want)
    assert loaded.parameter_counts(fresh) == m.parameter_counts(model)
    # a resumed run keeps the saved mask: prepare is a no-op now
    loaded.prepare(fresh, fisher_batches(), loss_fn(fresh, loaded))
    assert all(torch.equal(loaded._masks[n], m._masks[n]) for n in m._masks)


def test_bake_then_from_pretrained(tmp_path):
    model = tiny_gpt2()
    m = prepared(model)
    train(model, m, steps=2)
    assert_bake_round_trip(model, m, tmp_path / "hf")


def test_loss_falls_disable_restores_base_and_generation_runs():
    model = tiny_llama()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    m = prepared(model, keep_ratio=0.1)
    losses = train(model, m, steps=40, lr=2e-2)
    assert losses[-1] < 0.5 * losses[0]
    tuned = logits(model, m, ids, mask)

    assert_toggle_restores(model, m, ids, mask, base, tuned)

    seq = greedy(model, m, ids[:1, :3], new_tokens=5)
    assert seq.shape == (1, 8) and int(seq.max()) < VOCAB

    m.remove(model)
    assert torch.equal(logits(model, None, ids, mask), base)
    assert not any(p.requires_grad for p in model.parameters())


def test_prepare_without_batches_and_bad_deltas():
    model = tiny_llama()
    m = build_method(FishMaskConfig())
    m.apply(model)
    with pytest.raises(ValueError, match="no batches"):
        m.prepare(model, [], loss_fn(model, m))
    n = "model.norm.weight"
    for bad in (
        {n + ".indices": torch.tensor([0, 99]), n + ".values": torch.zeros(2)},  # out of range
        {n + ".indices": torch.tensor([0]), n + ".values": torch.zeros(1), "x.values": torch.zeros(1)},
        {"nope.indices": torch.tensor([0]), "nope.values": torch.zeros(1)},
    ):
        fresh = FishMaskMethod(FishMaskConfig())
        fresh.apply(model)
        with pytest.raises(ValueError, match="FishMask"):
            fresh.load_adapter_tensors(model, bad)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: FishMaskConfig(keep_ratio=0.0), "keep_ratio"),
        (lambda: FishMaskConfig(keep_ratio=1.5), "keep_ratio"),
        (lambda: method_config("fishmask", {"fisher_batches": 0}), "fisher_batches"),
    ],
)
def test_bad_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
