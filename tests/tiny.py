"""Tiny causal LMs built in code, one per attention layout the engine must handle. Seeded, CPU, fp32."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 128


def _finish(model):
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_llama(vocab: int = VOCAB, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """Llama layout with grouped-query attention (4 query heads, 2 KV heads), tied embeddings, no biases."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
        attn_implementation="sdpa",
    )
    return _finish(LlamaForCausalLM(cfg))


def tiny_qwen2(vocab: int = VOCAB, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 layout: GQA plus biases on q/k/v, untied head."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
        attn_implementation="sdpa",
    )
    return _finish(Qwen2ForCausalLM(cfg))


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
