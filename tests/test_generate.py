"""Streaming generation (core.generate): KV cache vs an uncached reference for every registered method (each
with its contract config, tiny.contract), the adapter bank, chat rendering, truncation, sampling and stopping.
Tiny Llama with SmolLM2's tokenizer, init 0.5 so that greedy decoding does not just repeat one token."""

from __future__ import annotations

import pytest
import torch

from core.checkpoint import load_adapter, save_adapter
from core.data import chat_prompt
from core.forward import logits
from core.generate import AdapterBank, GenerationSettings, generate, pick, stop_ids, stream
from core.methods import spec, specs
from test_train import tiny_lm, tokenizer
from tiny import contract_method, perturb

GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=10)
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]


def model():
    return tiny_lm(init=0.5)


def with_method(m, name: str, seed: int = 0):
    """Apply ``name`` with its contract config (tiny.contract; prepared where its spec prepares) and move every
    trainable tensor off its init (LoRA's B = 0 would make the test trivial). Base weights of init std 0.5 get
    less noise than new modules, so that the model stays a model."""
    method = contract_method(name, m, vocab=m.config.vocab_size)
    perturb(m, method, 0.05 if spec(name).trains_base else 0.3, seed=seed)
    m.requires_grad_(False)
    return method


def uncached_greedy(m, method, ids: list[int], n: int, stops: set[int]) -> list[int]:
    """Reference: the whole sequence through the model again for every new token, no cache."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(logits(m, method, torch.tensor([seq]))[0, -1].argmax())
            if t in stops:
                break
            out.append(t)
            seq.append(t)
    return out


def test_base_streaming_equals_transformers_generate():
    m, tok = model(), tokenizer()
    s = stream(m, tok, None, CHAT, GREEDY)
    text = "".join(s)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert s.prompt_ids == ids[0].tolist()
    ref = m.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=sorted(stop_ids(m, tok)), pad_token_id=2)
    assert s.token_ids == ref[0, ids.shape[1] :].tolist()
    assert len(set(s.token_ids)) > 3  # not a degenerate repetition
    assert text == tok.decode(s.token_ids, skip_special_tokens=True) == generate(m, tok, None, CHAT, GREEDY)


@pytest.mark.parametrize("name", list(specs()))
def test_kv_cache_streaming_equals_uncached_greedy(name):
    m, tok = model(), tokenizer()
    method = with_method(m, name)
    s = stream(m, tok, method, CHAT, GREEDY)
    deltas = list(s)
    assert s.token_ids == uncached_greedy(m, method, s.prompt_ids, 10, stop_ids(m, tok))
    assert "".join(deltas) == tok.decode(s.token_ids, skip_special_tokens=True)
    base = stream(model(), tok, None, CHAT, GREEDY)
    list(base)
    assert s.token_ids != base.token_ids  # the method really changes the output


def test_adapter_bank_switching_equals_each_adapter_alone(tmp_path):
    tok = tokenizer()
    names = ["lora", "prefix_tuning", "full", "bitfit"]
    for i, name in enumerate(names):
        m = model()
        save_adapter(m, with_method(m, name, seed=i), tmp_path / name)

    pristine = {k: v.clone() for k, v in model().state_dict().items()}
    bank = AdapterBank(model(), tok)
    for name in names:
        bank.add(name, tmp_path / name)
    ids = torch.tensor([chat_prompt(tok, CHAT)])
    for name in ["lora", "full", None, "prefix_tuning", "bitfit", "full"]:
        alone = model()
        method_alone = load_adapter(alone, tmp_path / name) if name else None
        method = bank.use(name)
        assert bank.active == name
        assert torch.equal(logits(bank.model, method, ids), logits(alone, method_alone, ids)), name
        assert bank.generate(name, CHAT, GREEDY) == generate(alone, tok, method_alone, CHAT, GREEDY), name
    bank.use(None)
    after = bank.model.state_dict()
    assert after.keys() == pristine.keys() and all(torch.equal(after[k], pristine[k]) for k in pristine)
    with pytest.raises(ValueError, match="no adapter named"):
        bank.use("nope")


def test_bank_refuses_an_adapter_for_another_base(tmp_path):
    m = tiny_lm(layers=3, init=0.5)
    save_adapter(m, with_method(m, "lora"), tmp_path / "a")
    bank = AdapterBank(model(), tokenizer())
    with pytest.raises(ValueError, match="different base model"):
        bank.add("a", tmp_path / "a")
    assert bank.names == []


def test_system_prompt_and_history_are_rendered_and_used():
    m, tok = model(), tokenizer()
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    pirate = GenerationSettings(temperature=0.0, max_new_tokens=8, system="You are a pirate.")
    s = stream(m, tok, None, history, pirate)
    list(s)
    text = tok.decode(s.prompt_ids)
    order = [text.find(x) for x in ("You are a pirate.", "My name is Ada.", "Nice to meet you, Ada.", "What is my name?")]
    assert -1 not in order and order == sorted(order)
    assert text.endswith("<|im_start|>assistant\n")
    plain = stream(m, tok, None, history, GenerationSettings(temperature=0.0, max_new_tokens=8))
    list(plain)
    assert "You are a pirate." not in tok.decode(plain.prompt_ids)
    assert s.token_ids != plain.token_ids  # the system prompt reaches the model
    short = stream(m, tok, None, history[-1:], pirate)
    list(short)
    assert short.token_ids != s.token_ids  # and so does the history


@pytest.mark.parametrize("name", [None, "prompt_tuning"])
def test_absurdly_long_prompt_is_truncated_to_the_context_and_reported(name):
    m, tok = model(), tokenizer()
    method = with_method(m, name) if name else None
    virtual = method.num_virtual_tokens if method else 0
    long = [{"role": "user", "content": "word " * 5000 + "the end"}]
    s = stream(m, tok, method, long, GenerationSettings(temperature=0.0, max_new_tokens=16))
    list(s)
    assert len(s.prompt_ids) == 256 - virtual - 16  # max_position_embeddings of tiny_lm
    assert s.dropped_tokens > 1000 and "context" in s.notice
    assert tok.decode(s.prompt_ids).endswith("the end<|im_end|>\n<|im_start|>assistant\n")
    assert len(s.token_ids) == 16 or s.finish_reason == "stop"


def test_generation_stops_at_end_of_turn():
    m, tok = model(), tokenizer()
    first = stream(m, tok, None, CHAT, GREEDY)
    list(first)
    m.generation_config.eos_token_id = [first.token_ids[2]]  # pretend the third token ends the turn
    s = stream(m, tok, None, CHAT, GREEDY)
    list(s)
    assert s.finish_reason == "stop" and s.token_ids == first.token_ids[:2]
    assert first.finish_reason == "length" and len(first.token_ids) == 10
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_ids(m, tok)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy():
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(3, 50, generator=g)
    assert torch.equal(pick(lg, 0.0, 0.9, None), lg.argmax(-1, keepdim=True))
    assert torch.equal(pick(lg, 1.0, 1e-6, torch.Generator().manual_seed(1)), lg.argmax(-1, keepdim=True))
    draws = pick(lg[:1].expand(2000, -1), 1.0, 1.0, torch.Generator().manual_seed(2))
    assert len(set(draws.flatten().tolist())) > 5  # temperature 1: really samples
    m, tok = model(), tokenizer()
    hot = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)
    assert generate(m, tok, None, CHAT, hot) == generate(m, tok, None, CHAT, hot)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="messages"):
        stream(m, tok, None, [], GREEDY)
