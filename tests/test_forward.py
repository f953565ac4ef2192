"""core.forward's speed levers change nothing but speed and memory: the fused chunked cross-entropy, running
right-padded batches without a mask, cutting a batch into pieces, packing, and running the prompt prefix all rows
share once give the same loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.config import method_config
from core.data import Example, LengthGroupedBatches, collate
from core.forward import (IGNORE, PREFIX_MIN, SharedPrefix, head_cross_entropy, packed, pieces,
                          shared_prefix, supervised_loss)
from core.methods import build_method
from tiny import TINY_MODELS


@pytest.mark.parametrize("bias,head_trains", [(False, False), (True, True)])
def test_fused_head_cross_entropy_matches_the_plain_one(bias, head_trains):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(head_trains)
    h = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    ref = F.cross_entropy(head(h), targets, reduction="sum")
    (3 * ref).backward()
    want = [t.grad.clone() for t in (h, *head.parameters()) if t.requires_grad]
    for t in (h, *head.parameters()):
        t.grad = None
    got = head_cross_entropy(head, h, targets, chunk=4)  # 3 chunks, the last one short
    (3 * got).backward()
    torch.testing.assert_close(got, ref)
    for w, g in zip(want, [t.grad for t in (h, *head.parameters()) if t.requires_grad]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradient work, same value
        torch.testing.assert_close(head_cross_entropy(head, h, targets, chunk=4), ref.detach())


def _examples(lengths: list[int], vocab: int = 128) -> list[Example]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))  # the second half is trained
    return out


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "prefix_tuning"])
def test_pieces_without_mask_give_the_padded_batch_gradient(arch, kind):
    model = TINY_MODELS[arch]()
    torch.manual_seed(0)
    knobs = {"r": 4, "targets": ["all-linear"]} if kind == "lora" else {"num_virtual_tokens": 3}
    if kind == "prefix_tuning":
        knobs["encoder_hidden"] = 8
    method = build_method(method_config(kind, knobs))
    method.apply(model)
    with torch.no_grad():  # LoRA's B starts at zero; make every parameter matter
        for p in method.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    params = list(method.trainable_parameters(model).values())
    b = collate(_examples([12, 5, 9, 3, 12, 7]), pad_id=0)

    def grads(parts):
        for p in params:
            p.grad = None
        total = 0.0
        for ids, mask, labels in parts:
            s, _ = supervised_loss(model, method, ids, mask, labels)
            s.backward()
            total += float(s.detach())
        return total, [p.grad.clone() for p in params]

    want_loss, want = grads([(b.input_ids, b.attention_mask, b.labels)])
    cut = pieces(b.input_ids, b.attention_mask, b.labels, max_tokens=20, overhead=2)
    assert len(cut) > 1 and all(ids.shape[0] * ids.shape[1] <= 20 or ids.shape[0] == 1 for ids, _ in cut)
    assert sum(ids.shape[0] for ids, _ in cut) == 6
    for parts in ([(b.input_ids, None, b.labels)], [(ids, None, labels) for ids, labels in cut]):
        loss, got = grads(parts)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _trained(model: nn.Module, kind: str) -> tuple:
    """(method, its trainable tensors): ``kind`` (LoRA on every linear, or full/adapter defaults) applied to
    ``model`` with seeded weights moved off their init, so every gradient is non-trivial."""
    torch.manual_seed(0)
    method = build_method(method_config(kind, {"r": 4, "targets": ["all-linear"]} if kind == "lora" else {}))
    method.apply(model)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    return method, list(method.trainable_parameters(model).values())


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_packed_rows_give_the_padded_batch_loss_and_gradient(arch, kind):
    """Padding-free packing (the CUDA path): sequences back to back in one row, positions restarting at each,
    equal the padded batch exactly, including a sequence whose every token is trained (its first label would
    otherwise be the previous sequence's target)."""
    model = TINY_MODELS[arch]()
    method, params = _trained(model, kind)
    examples = _examples([12, 5, 9, 3, 12, 7])
    examples[3] = Example(examples[3].input_ids, list(examples[3].input_ids))  # every token trained
    b = collate(examples, pad_id=0)

    def grads(parts):
        for p in params:
            p.grad = None
        total, count = 0.0, 0
        for ids, mask, labels, pos in parts:
            s, n = supervised_loss(model, method, ids, mask, labels, pos)
            s.backward()
            total, count = total + float(s.detach()), count + int(n)
        return total, count, [p.grad.clone() for p in params]

    want_loss, want_n, want = grads([(b.input_ids, b.attention_mask, b.labels, None)])
    rows = packed(b.input_ids, b.attention_mask, b.labels, max_tokens=30)
    assert [tuple(ids.shape) for ids, _, _ in rows] == [(1, 29), (1, 19)]  # 12+5+9+3, then 12+7: no padding
    assert rows[0][2].tolist() == [[*range(12), *range(5), *range(9), *range(3)]]
    loss, n, got = grads([(ids, None, labels, pos) for ids, labels, pos in rows])
    assert n == want_n and loss == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _sharing(lengths: list[int], prefix: int, trained_from: int) -> list[Example]:
    """Rows that start with the same ``prefix`` tokens, each trained from position ``trained_from`` on."""
    g = torch.Generator().manual_seed(5)
    head = torch.randint(1, 128, (prefix,), generator=g).tolist()
    out = []
    for n in lengths:
        ids = head + torch.randint(1, 128, (n - prefix,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * min(trained_from, n) + ids[trained_from:]))
    return out


def test_the_shared_prefix_stops_before_a_target_a_difference_or_a_rows_end():
    b = collate(_sharing([20, 14, 17], prefix=10, trained_from=12), pad_id=0)
    assert shared_prefix(b.input_ids, b.attention_mask, b.labels) == 10  # where the rows start to differ
    b = collate(_sharing([20, 18, 17], prefix=16, trained_from=12), pad_id=0)
    assert shared_prefix(b.input_ids, b.attention_mask, b.labels) == 11  # the token at 12 is a target of 11
    b = collate(_sharing([20, 12, 17], prefix=12, trained_from=13), pad_id=0)
    assert shared_prefix(b.input_ids, b.attention_mask, b.labels) == 11  # a row keeps a token of its own
    b = collate(_sharing([20, 14], prefix=PREFIX_MIN - 1, trained_from=12), pad_id=0)
    assert shared_prefix(b.input_ids, b.attention_mask, b.labels) == 0  # too short to be worth a pass
    b = collate(_sharing([20], prefix=10, trained_from=12), pad_id=0)
    assert shared_prefix(b.input_ids, b.attention_mask, b.labels) == 0  # one row: nothing to share


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("kind", ["lora", "full", "adapter"])
def test_a_shared_prefix_run_once_gives_the_batch_loss_and_gradient(arch, kind):
    """The rows' common prefix runs once (SharedPrefix) and the rest of each row, cut into pieces with a backward
    each, attends to its keys and values: the loss and every gradient (embeddings included, for full
    fine-tuning) equal the padded batch's."""
    model = TINY_MODELS[arch]()
    method, params = _trained(model, kind)
    b = collate(_sharing([22, 15, 19, 12, 22], prefix=10, trained_from=11), pad_id=0)

    def grads(prefix_len: int):
        for p in params:
            p.grad = None
        if not prefix_len:
            s, _ = supervised_loss(model, method, b.input_ids, b.attention_mask, b.labels)
            s.backward()
            return float(s.detach()), [p.grad.clone() for p in params]
        prefix = SharedPrefix(model, method, b.input_ids[:1, :prefix_len])
        cut = pieces(b.input_ids[:, prefix_len:], b.attention_mask[:, prefix_len:], b.labels[:, prefix_len:],
                     max_tokens=24, overhead=2)
        assert len(cut) > 1
        total = 0.0
        for ids, labels in cut:
            s, _ = supervised_loss(model, method, ids, None, labels, prefix=prefix)
            s.backward()
            total += float(s.detach())
        prefix.backward()
        return total, [p.grad.clone() for p in params]

    want_loss, want = grads(0)
    k = shared_prefix(b.input_ids, b.attention_mask, b.labels)
    assert k == 10
    loss, got = grads(k)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_pieces_trim_padding_and_respect_the_budget():
    b = collate(_examples([40, 38, 10, 9, 8, 3]), pad_id=0)
    cut = pieces(b.input_ids, b.attention_mask, b.labels, max_tokens=80, overhead=8)
    shapes = [tuple(ids.shape) for ids, _ in cut]
    assert shapes == [(2, 40), (4, 10)]  # long rows together, short rows together, each trimmed
    assert pieces(b.input_ids, b.attention_mask, b.labels, max_tokens=10**6, overhead=10**6)[0][0] is b.input_ids
    rows = pieces(b.input_ids, b.attention_mask, b.labels, max_tokens=1)  # every row alone, even over budget
    assert [tuple(ids.shape) for ids, _ in rows] == [(1, 40), (1, 38), (1, 10), (1, 9), (1, 8), (1, 3)]


def test_ungrouped_batches_are_random_draws_with_the_longest_first():
    examples = _examples([5 + (i * 37) % 60 for i in range(64)])
    grouped = LengthGroupedBatches(examples, 8, seed=1, pad_id=0)
    random_ = LengthGroupedBatches(examples, 8, seed=1, pad_id=0, group=False)
    plan = random_.plan(0)
    assert sorted(i for b in plan for i in b) == list(range(64))
    assert max(random_.lengths[i] for i in plan[0]) == max(random_.lengths)
    assert random_.padding_waste() > grouped.padding_waste()  # batches mix lengths: no grouping
    assert plan == random_.plan(0) and plan != random_.plan(1)  # deterministic per (seed, epoch)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_packed_rows_after_a_shared_prefix_give_the_batch_loss_and_gradient(arch, kind):
    """The CPU training path (core.train._work): the shared prefix runs once, the rest of the rows run as packed
    rows whose positions continue after it, and core.attention keeps each sequence to the prefix and itself:
    the loss and every gradient equal the padded batch's."""
    from core import attention
    from core.train import packs

    model = TINY_MODELS[arch]()
    attention.use(model)
    method, params = _trained(model, kind)
    assert packs(method, torch.device("cpu"), model)
    b = collate(_sharing([22, 15, 19, 12, 22], prefix=10, trained_from=11), pad_id=0)

    def grads(packed_rows: bool):
        for p in params:
            p.grad = None
        if not packed_rows:
            s, _ = supervised_loss(model, method, b.input_ids, b.attention_mask, b.labels)
            s.backward()
            return float(s.detach()), [p.grad.clone() for p in params]
        k = shared_prefix(b.input_ids, b.attention_mask, b.labels)
        prefix = SharedPrefix(model, method, b.input_ids[:1, :k])
        rows = packed(b.input_ids[:, k:], b.attention_mask[:, k:], b.labels[:, k:], max_tokens=20, start=k)
        assert [tuple(ids.shape) for ids, _, _ in rows] == [(1, 17), (1, 11), (1, 12)]  # 12+5, 9+2, 12
        assert rows[0][2].tolist() == [[*range(10, 22), *range(10, 15)]]
        total = 0.0
        for ids, labels, pos in rows:
            s, _ = supervised_loss(model, method, ids, None, labels, pos, prefix)
            s.backward()
            total += float(s.detach())
        prefix.backward()
        return total, [p.grad.clone() for p in params]

    want_loss, want = grads(False)
    loss, got = grads(True)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method_name,packs_rows", [("lora", True), ("bitfit", True), ("prompt_tuning", False)])
def test_cpu_training_runs_packed_rows_unless_a_method_prepends_virtual_tokens(method_name, packs_rows, tmp_path,
                                                                               monkeypatch):
    """train() on the CPU packs each micro-batch (after its shared prefix) when the model runs core.attention;
    methods with virtual tokens keep length-tight pieces, and so does a model whose attention is not ours."""
    import core.train as core_train
    from test_train import run, run_config, tiny_lm, write_qa

    calls = {"packed": 0, "pieces": 0}
    for name in calls:
        real = getattr(core_train, name)
        monkeypatch.setattr(core_train, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **k))
    cfg = run_config(write_qa(tmp_path / "qa.json"), method_config(method_name, {}), max_steps=2)
    events = run(cfg, tmp_path / "run")
    assert events[-1]["status"] == "completed"
    assert (calls["packed"] > 0, calls["pieces"] > 0) == (packs_rows, not packs_rows)
    plain = tiny_lm()  # sdpa: transformers' own attention would mix the sequences of a packed row after a prefix
    assert not core_train.packs(build_method(method_config("lora", {})), torch.device("cpu"), plain)


def test_packed_cpu_rows_only_for_families_whose_attention_splits_them():
    """core.attention splits a packed CPU row only where every layer is full attention and the position_ids reach
    it: llama, qwen2, gpt2 (each trained above). A sliding window, or a family not on the list, keeps pieces."""
    from transformers import MistralConfig, MistralForCausalLM

    from core import attention
    from core.train import packs

    lora = build_method(method_config("lora", {}))
    for arch in TINY_MODELS:
        model = TINY_MODELS[arch]()
        assert not packs(lora, torch.device("cpu"), model)  # transformers' own sdpa
        attention.use(model)
        assert packs(lora, torch.device("cpu"), model)
    model = TINY_MODELS["qwen2"]()
    model.config.use_sliding_window = True
    attention.use(model)
    assert not packs(lora, torch.device("cpu"), model)
    other = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    attention.use(other)
    assert attention.runs(other) and not packs(lora, torch.device("cpu"), other)
