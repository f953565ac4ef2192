"""GGUF export: written with our code, read back with transformers' own GGUF loader, compared with the HF folder."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.gguf_export import export_gguf, interleave_rotary
from core.models import load_tokenizer
from tiny import tiny_llama, tiny_qwen2

PROMPT = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the packaged SmolLM2 tokenizer: 49,152 byte-level BPE tokens


def _folder(tmp_path, build, tokenizer):
    model = build(vocab=49152)
    with torch.no_grad():  # larger weights than the init's 0.02, so f16 rounding and a wrong layout both show
        for p in model.parameters():
            p.normal_(0, 0.5) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return model


def _greedy(model, ids, n=12):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_f16_gguf_reads_back_with_the_same_tokenizer_logits_and_greedy_answer(tmp_path, build, tokenizer):
    model = _folder(tmp_path, build, tokenizer)
    export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")

    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    same = back_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(same["input_ids"], ids)  # vocabulary, merges, special tokens and chat template survive
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    # f16 weights: close, not equal; a wrong q/k order or a missing bias would be off by O(1)
    assert (want - got).abs().max() < 2e-2 * want.abs().max()
    assert torch.equal(_greedy(model, ids), _greedy(back, ids))


def test_q8_0_is_smaller_and_close(tmp_path, tokenizer):
    model = _folder(tmp_path, tiny_llama, tokenizer)
    f16 = export_gguf(tmp_path / "hf", tmp_path / "f16.gguf", "f16").stat().st_size
    q8 = export_gguf(tmp_path / "hf", tmp_path / "q8.gguf", "q8_0").stat().st_size
    weights_2d = sum(p.numel() for p in model.parameters() if p.ndim == 2)  # tied head counted once
    assert f16 - q8 == pytest.approx(weights_2d * (2 - 34 / 32), rel=0.01)  # Q8_0: 34 bytes per 32 weights vs 64
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 200, 3000, 45, 9]])
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    # each weight is rounded to 1/127 of its block's largest; through 3 random layers with std 0.5 that grows to a
    # relative logit error of 0.066 (measured); a wrong layout or scale would be near 1
    assert (want - got).norm() < 0.1 * want.norm(), float((want - got).norm() / want.norm())


def test_interleave_rotary_is_a_per_head_permutation():
    w = torch.arange(2 * 8 * 3).reshape(16, 3).numpy()  # 2 heads of d = 8, in = 3
    out = interleave_rotary(w, heads=2)
    assert sorted(out[:, 0].tolist()) == sorted(w[:, 0].tolist())
    # head 0's rows 0..3 (first half) and 4..7 (second half) alternate: 0, 4, 1, 5, ...
    assert (out[:8, 0] // 3).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_unsupported_model_and_encoding_are_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supports llama, qwen2 models; this one is 'gpt2'"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="encoding = 'q4' is invalid"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "q4")  # type: ignore[arg-type]


def test_cli_export_gguf_of_a_trained_lora_run_answers_like_the_merged_folder(tmp_path, capsys):
    from core.__main__ import main
    from test_train import save_tiny_lm, write_qa

    model_dir, data = save_tiny_lm(tmp_path / "model", init=0.5), write_qa(tmp_path / "qa.json", n=12)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--method", "lora", "--r", "4",
                 "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--max-len", "64", "--out", str(run)]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--gguf", "f16"]) == 0
    assert "GGUF written to" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", gguf_file="model-f16.gguf",
                                                dtype=torch.float32).eval()
    ids = torch.tensor([[1, 400, 500, 600, 2]])
    assert torch.equal(_greedy(merged, ids), _greedy(back, ids))
