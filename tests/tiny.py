"""Tiny causal LMs built in code, one per attention layout the engine must handle. Seeded, CPU, fp32.

Plus the small helpers the method tests share: fixed token batches, a plain AdamW overfitting loop, greedy decoding,
and the save / bake round trips."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from core.checkpoint import save_adapter
from core.forward import logits, supervised_loss

VOCAB = 128


def _finish(model):
    model.eval()
    model.requires_grad_(False)
    return model


def _gqa(config_cls, model_cls, vocab: int, layers: int, seed: int, tied: bool):
    """The shared GQA shape of the llama and qwen2 builders: d=32, ff=64, 4 query heads over 2 KV heads."""
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, pad_token_id=0,
        attn_implementation="sdpa",
    )
    return _finish(model_cls(cfg))


def tiny_llama(vocab: int = VOCAB, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """Llama layout with grouped-query attention (4 query heads, 2 KV heads), tied embeddings, no biases."""
    return _gqa(LlamaConfig, LlamaForCausalLM, vocab, layers, seed, tied=True)


def tiny_qwen2(vocab: int = VOCAB, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 layout: GQA plus biases on q/k/v, untied head."""
    return _gqa(Qwen2Config, Qwen2ForCausalLM, vocab, layers, seed, tied=False)


def tiny_gpt2(vocab: int = VOCAB, layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 layout: fused Conv1D attention (c_attn), learned positions, biases everywhere."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=256, pad_token_id=0,
                     attn_implementation="sdpa")
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
