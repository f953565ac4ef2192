"""Write a merged Hugging Face model folder as one GGUF file, for llama.cpp, Ollama and LM Studio.

    export_gguf("exported/merged", "exported/model-f16.gguf", "f16")

Supported: the Llama family (SmolLM2, Llama, Mistral-shaped Llama configs) and Qwen2, the layouts whose GGUF tensor
names and metadata ``transformers`` reads back (``from_pretrained(folder, gguf_file=...)``), which is how the export
is verified. Two encodings:

    f16     every 2-D weight in float16, norms and biases in float32        (the reference: greedy answers identical)
    q8_0    every 2-D weight in blocks of 32 int8 values with one fp16 scale (≈ 8.5 bits a weight; answers may drift)

Tensor names follow llama.cpp's convention (``blk.<l>.attn_q.weight`` ...). llama.cpp stores the query and key
projections of Llama-architecture models with the two halves of each head's rotary dimensions interleaved; for a
weight W of shape (heads·d, in), row (h, i, j) of the view (heads, 2, d/2, in) moves to (h, j, i):

    W_gguf = W.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(heads·d, in)

and readers undo it. Qwen2 keeps the Hugging Face order. The tokenizer (byte-level BPE, as in tokenizer.json) goes
into the file as its token list, token types (special tokens are "control") and merges, with the special token ids
and the chat template, so the one file is all a runtime needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

Encoding = Literal["f16", "q8_0"]
ARCHITECTURES = ("llama", "qwen2")

_BLOCK_NAMES = {  # Hugging Face name inside block l -> GGUF name inside blk.l
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face Llama/Qwen2 parameter name; ValueError for one it does not know."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model . layers . <l> . <rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _BLOCK_NAMES:
        return f"blk.{int(parts[2])}.{_BLOCK_NAMES[parts[3]]}"
    raise ValueError(f"GGUF export: no GGUF name for tensor {hf_name!r}")


def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of a Llama query/key projection (see the module docstring); (heads·d, in) -> same shape."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(model_dir: str | Path, out: str | Path, encoding: Encoding = "f16") -> Path:
    """Write ``model_dir`` (a merged HF folder with config.json, safetensors weights and tokenizer.json) to ``out``
    atomically. ValueError, with one sentence, for an architecture or encoding it cannot write."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    if encoding not in ("f16", "q8_0"):
        raise ValueError(f"GGUF export: encoding = {encoding!r} is invalid: choose 'f16' or 'q8_0'")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is {arch!r}")
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    if not weights:
        raise ValueError(f"GGUF export: {model_dir} holds no .safetensors weights")

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(config.get("_name_or_path") or model_dir.name)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(_rope_theta(config))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config["vocab_size"])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if encoding == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(file_type)
    _add_tokenizer(w, model_dir, config)

    tied = config.get("tie_word_embeddings", False)
    for name, t in weights.items():
        if tied and name == "lm_head.weight":
            continue  # a missing output.weight tells readers the head is tied
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = interleave_rotary(a, heads if name.endswith("q_proj.weight") else kv_heads)
        _add_tensor(w, gguf, gguf_name(name), a, encoding)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _add_tensor(w, gguf, name: str, a: np.ndarray, encoding: Encoding) -> None:
    """2-D weights in the chosen encoding; 1-D norms and biases stay float32 (as llama.cpp writes them)."""
    if a.ndim == 1:
        w.add_tensor(name, a.astype(np.float32))
    elif encoding == "f16":
        w.add_tensor(name, a.astype(np.float16))
    else:
        q = gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def _add_tokenizer(w, model_dir: Path, config: dict) -> None:
    """Byte-level BPE from tokenizer.json: tokens by id, their types, merges, special ids, chat template."""
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(f"GGUF export: {model_dir} has no tokenizer.json")
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    for a in tok.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # 5: unused (ids the vocabulary leaves empty)
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = 3 if text in special else 1  # 3: control, 1: normal
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if config.get("model_type") == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
        value = tc.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in vocab:
            add(vocab[value])
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    template = tc.get("chat_template")
    if not template and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        w.add_chat_template(template)


__all__ = ["ARCHITECTURES", "export_gguf", "gguf_name", "interleave_rotary"]
