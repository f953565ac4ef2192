"""Tiny causal LMs built in code, one per attention layout the engine must handle. Seeded, CPU, fp32.

Plus the small helpers the method tests share: fixed token batches, a plain AdamW overfitting loop, greedy decoding,
the save / bake round trips, and the per-method settings of the contract tests (``contract``)."""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from core.checkpoint import save_adapter
from core.forward import IGNORE, logits, supervised_loss
from core.methods import build_method, method_config, spec
from core.methods.base import Method, RunPlan

VOCAB = 128


def _finish(model):
    model.eval()
    model.requires_grad_(False)
    return model


def _gqa(config_cls, model_cls, vocab: int, layers: int, seed: int, tied: bool, init: float):
    """The shared GQA shape of the llama and qwen2 builders: d=32, ff=64, 4 query heads over 2 KV heads; weights
    drawn with std ``init``."""
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, pad_token_id=0,
        attn_implementation="sdpa", initializer_range=init,
    )
    return _finish(model_cls(cfg))


def tiny_llama(vocab: int = VOCAB, layers: int = 3, seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    """Llama layout with grouped-query attention (4 query heads, 2 KV heads), tied embeddings, no biases."""
    return _gqa(LlamaConfig, LlamaForCausalLM, vocab, layers, seed, tied=True, init=init)


def tiny_qwen2(vocab: int = VOCAB, layers: int = 2, seed: int = 0, init: float = 0.02) -> Qwen2ForCausalLM:
    """Qwen2 layout: GQA plus biases on q/k/v, untied head."""
    return _gqa(Qwen2Config, Qwen2ForCausalLM, vocab, layers, seed, tied=False, init=init)


def tiny_gpt2(vocab: int = VOCAB, layers: int = 2, seed: int = 0, init: float = 0.02) -> GPT2LMHeadModel:
    """GPT-2 layout: fused Conv1D attention (c_attn), learned positions, biases everywhere."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=256, pad_token_id=0,
                     attn_implementation="sdpa", initializer_range=init)
    return _finish(GPT2LMHeadModel(cfg))


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def batch(vocab: int = VOCAB, b: int = 2, t: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the second row right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, -3:] = 0
        ids[1, -3:] = 0
    return ids, mask


def examples(n: int = 8, t: int = 12, seed: int = 3, vocab: int = VOCAB) -> torch.Tensor:
    """n random sequences of t tokens drawn from ids 1 .. vocab-1, no padding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, t), generator=g)


def overfit_data(n: int = 8, t: int = 12, seed: int = 3, vocab: int = VOCAB):
    """(ids, mask, labels) of `examples`: every token is supervised."""
    ids = examples(n, t, seed, vocab)
    return ids, torch.ones_like(ids), ids.clone()


def overfit(model, method, steps: int, lr: float = 1e-2, vocab: int = VOCAB) -> list[float]:
    """Plain AdamW on `overfit_data` over all the model's parameters. Returns the loss of every step."""
    ids, mask, labels = overfit_data(vocab=vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)  # frozen params are in it too: they must get no grad
    losses = []
    for _ in range(steps):
        loss_sum, n = supervised_loss(model, method, ids, mask, labels)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def one_step(model, method) -> tuple[dict, dict, dict]:
    """(frozen, trained, now): copies of the frozen and of the trained parameters before one `overfit` step, and
    the model's parameters after it."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in method.trainable_parameters(model).items()}
    overfit(model, method, steps=1)
    return frozen, trained, dict(model.named_parameters())


def greedy(model, method, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Uncached greedy decoding: the prompt followed by new_tokens argmax tokens."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = logits(model, method, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def assert_greedy_runs(model, method, ids: torch.Tensor) -> None:
    """Greedy decoding of 6 tokens after the first 4 of ids[0] keeps the prompt, stays in the vocabulary and is
    deterministic."""
    out = greedy(model, method, ids[:1, :4], new_tokens=6)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], ids[:1, :4])
    assert 0 <= int(out.min()) and int(out.max()) < VOCAB
    assert torch.equal(out, greedy(model, method, ids[:1, :4], new_tokens=6))  # deterministic


def sharpened(kind: str) -> torch.nn.Module:
    """A tiny model whose frozen LM head can express a peaked distribution.

    The tiny models are initialised with std 0.02, so with a frozen final norm and head every logit stays below
    ~0.7 and no method that leaves them frozen can win more than a few tenths of a nat. Scaling the token
    embeddings (and an untied head) by 10 lifts that cap, so overfitting can show."""
    model = TINY_MODELS[kind]()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.get_output_embeddings().weight.mul_(10)
    return model


def lively(kind: str, layers: int = 2) -> torch.nn.Module:
    """A tiny model whose frozen parts do real work: every weight drawn with std 0.3 instead of 0.02.

    For the memorising check. With std 0.02 (even `sharpened`) the blocks' outputs are tiny next to the residual
    stream, so whatever a frozen-body method adds (a prompt, a prefix, biases) barely reaches the head: on
    sharpened("llama") prompt tuning and P-Tuning stayed at token accuracy 0.00 (loss flat at 6.75) after 300
    steps, BitFit at 0.01. With std 0.3 the frozen head can express a peaked distribution as well."""
    return TINY_MODELS[kind](layers=layers, init=0.3)


def saved_logits(model, method, folder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Save the adapter to folder; returns (ids, mask, logits) on `batch()` to compare a reload against."""
    ids, mask = batch()
    want = logits(model, method, ids, mask)
    save_adapter(model, method, folder)
    return ids, mask, want


def assert_bake_round_trip(model, method, folder) -> None:
    """Bake the method in, save_pretrained to folder, reload with transformers: the same logits, bit for bit."""
    ids, mask = batch()
    want = logits(model, method, ids, mask)
    method.bake(model)
    model.save_pretrained(folder)
    back = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(back, None, ids, mask), want)


def assert_toggle_restores(model, method, ids, mask, base, tuned=None) -> None:
    """Disabled gives the base logits; re-enabled gives the tuned ones again (checked when tuned is given)."""
    method.set_enabled(model, False)
    assert torch.equal(logits(model, method, ids, mask), base)
    method.set_enabled(model, True)
    if tuned is not None:
        assert torch.equal(logits(model, method, ids, mask), tuned)


# ---- the contract tests' per-method settings and helpers (tests/test_contract.py, tests/test_generate.py) ---------

TESTS = Path(__file__).parent


@cache
def contract(name: str) -> dict[str, Any]:
    """Method ``name``'s contract settings, ``{}`` when it has none (then the defaults apply).

    Looked up, with no edit of the contract test, in the method's own test module: ``CONTRACT`` (a dict) in
    ``tests/test_<name>.py``; or, for methods that share a test module (the prompt methods share
    ``test_prompt_methods.py``), the entry ``name`` of a ``CONTRACTS`` dict in any ``tests/test_*.py``. Keys:

        config    method-config values over the registered defaults
        lr        AdamW learning rate of the memorising check; steps: its optimiser steps
        accuracy  the memorising bar (token accuracy on the supervised positions); measured: the value seen
        noise     std of the noise added to the trainable tensors before the equality checks
        load_atol tolerance of save -> load (0: bit-identical logits)
    """
    if (TESTS / f"test_{name}.py").is_file():
        found = getattr(importlib.import_module(f"test_{name}"), "CONTRACT", None)
        if found is not None:
            return dict(found)
    for path in sorted(TESTS.glob("test_*.py")):
        if "CONTRACTS" in path.read_text(encoding="utf-8"):
            table = getattr(importlib.import_module(path.stem), "CONTRACTS", {})
            if name in table:
                return dict(table[name])
    return {}


def contract_config(name: str):
    """The typed config of ``name`` for the contract tests: registered defaults, then ``contract(name)['config']``."""
    return method_config(name, contract(name).get("config", {}))


def prepare_batches(vocab: int = VOCAB) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`overfit_data` as two (ids, mask, labels) batches of 4: what a method's prepare() sees in the tests."""
    ids, mask, labels = overfit_data(vocab=vocab)
    return [(ids[:4], mask[:4], labels[:4]), (ids[4:], mask[4:], labels[4:])]


def mean_loss_fn(model, method):
    """loss_fn(batch) = mean token cross-entropy of (ids, mask, labels), as the training loop hands to prepare()."""

    def loss_fn(b):
        loss_sum, n = supervised_loss(model, method, *b)
        return loss_sum / n.clamp(min=1)

    return loss_fn


def contract_method(name: str, model, vocab: int = VOCAB, steps: int = 100, lr: float = 1e-2) -> Method:
    """Build ``name`` from its contract config, apply it, and run prepare() (on `prepare_batches`) when its spec
    says it prepares. Seeded, so the same call gives the same method."""
    torch.manual_seed(0)
    method = build_method(contract_config(name))
    method.apply(model)
    if spec(name).prepares:
        method.prepare(model, prepare_batches(vocab), mean_loss_fn(model, method), RunPlan(steps, lr))
    return method


@torch.no_grad()
def perturb(model, method, scale: float, seed: int = 0) -> None:
    """Add N(0, scale²) noise to every trainable tensor, then after_step (a masked method re-imposes its mask), so
    that every delta is non-zero (LoRA's B and an adapter's W_up start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in method.trainable_parameters(model).values():
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))
    method.after_step(model)


@torch.no_grad()
def token_accuracy(model, method, ids, mask, labels) -> float:
    """Teacher-forced accuracy: the share of supervised positions t+1 whose token is the argmax of logits at t."""
    pred = logits(model, method, ids, mask)[:, :-1].argmax(-1)  # (B, T-1)
    target = labels[:, 1:]
    keep = target != IGNORE
    return (pred[keep] == target[keep]).float().mean().item()


def memorise(model, method, steps: int, lr: float) -> float:
    """AdamW (no weight decay) on the method's trainable parameters over the 8 `overfit_data` examples, with
    after_step after every step. Returns the token accuracy reached on those examples."""
    ids, mask, labels = overfit_data()
    opt = torch.optim.AdamW(list(method.trainable_parameters(model).values()), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss_sum, n = supervised_loss(model, method, ids, mask, labels)
        opt.zero_grad()
        (loss_sum / n).backward()
        opt.step()
        method.after_step(model)
    return token_accuracy(model, method, ids, mask, labels)
