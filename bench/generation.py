"""Chat generation speed on the default model (`python -m bench.generation [--quick]`), one process, one JSON line.

Greedy decoding of the same chat prompt, each variant run ``REPEATS`` times interleaved (the median is kept):

    hf-streamer     plain ``model.generate`` with a ``TextIteratorStreamer`` in a thread (the usual recipe)
    ours            ``core.generate.stream`` on the base model
    lora            ``core.generate.stream`` with a LoRA (r=8, q_proj/v_proj, random non-zero B) unmerged
    lora-merged     the same LoRA merged into the base weights (``method.merge``)

ttft_s is the time from the call to the first visible text; tokens_per_s counts the tokens after the first
one, over the time after the first text (the decode rate). Greedy runs produce identical tokens on both sides,
which is checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from core.config import DEFAULT_MODEL, method_config
from core.generate import GenerationSettings, stream
from core.methods import build_method
from core.models import load_model

PROMPT = [{"role": "user", "content": "Write a detailed story about a lighthouse keeper who finds a message in a bottle."}]
REPEATS = 3


def run_ours(model, tokenizer, method, new_tokens: int) -> dict:
    settings = GenerationSettings(temperature=0.0, max_new_tokens=new_tokens)
    t0 = time.perf_counter()
    s = stream(model, tokenizer, method, PROMPT, settings)
    first = None
    for delta in s:
        if first is None and delta:
            first = time.perf_counter()
    end = time.perf_counter()
    return _timing(t0, first or end, end, s.new_tokens, list(s.token_ids), s.prompt_ids)


def run_hf(model, tokenizer, prompt_ids: list[int], new_tokens: int) -> dict:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = torch.tensor([prompt_ids])
    out: dict = {}
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                  streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    t0 = time.perf_counter()
    thread = threading.Thread(target=lambda: out.setdefault("ids", model.generate(**kwargs)))
    thread.start()
    first = None
    for text in streamer:
        if first is None and text:
            first = time.perf_counter()
    thread.join()
    end = time.perf_counter()
    new = out["ids"][0, len(prompt_ids):].tolist()
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    while new and new[-1] in stops:  # ours does not count the stop token either
        new.pop()
    return _timing(t0, first or end, end, len(new), new, prompt_ids)


def _timing(t0: float, first: float, end: float, n: int, ids: list[int], prompt_ids: list[int]) -> dict:
    return {"ttft_s": first - t0, "tokens_per_s": max(0, n - 1) / max(end - first, 1e-9), "new_tokens": n,
            "ids": ids, "prompt_tokens": len(prompt_ids)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.generation")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    new_tokens = 48 if args.quick else 128
    torch.manual_seed(0)
    model, tokenizer = load_model(DEFAULT_MODEL)
    config = method_config("lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]})
    lora = build_method(config)
    lora.apply(model)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would make the LoRA a no-op
        for layer in lora.layers(model).values():
            layer.lora_B.weight.normal_(0.0, 1e-3)
    tensors = {k: v.detach().clone() for k, v in lora.adapter_tensors(model).items()}
    lora.remove(model)  # base and hf-streamer run on the plain model
    model.eval()

    def base():
        return run_ours(model, tokenizer, None, new_tokens)

    def hf():
        return run_hf(model, tokenizer, prompt_ids, new_tokens)

    def with_lora(merge: bool) -> dict:
        method = build_method(config)
        method.apply(model)
        method.load_adapter_tensors(model, tensors)
        model.requires_grad_(False)
        model.eval()
        if merge:
            method.merge(model)
        try:
            return run_ours(model, tokenizer, method, new_tokens)
        finally:
            method.remove(model)

    probe = stream(model, tokenizer, None, PROMPT, GenerationSettings(temperature=0.0, max_new_tokens=1))
    list(probe)
    prompt_ids = probe.prompt_ids  # what ours renders; the HF side gets the very same ids
    base(), hf()  # warm-up
    variants = {"hf-streamer": hf, "ours": base, "lora": lambda: with_lora(False), "lora-merged": lambda: with_lora(True)}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(REPEATS):
        for name, fn in variants.items():
            runs[name].append(fn())
    result = {}
    for name, rs in runs.items():
        result[name] = {
            "ttft_s": statistics.median(r["ttft_s"] for r in rs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "new_tokens": rs[0]["new_tokens"],
        }
    if runs["hf-streamer"][0]["ids"] != runs["ours"][0]["ids"]:
        raise RuntimeError(f"greedy tokens differ: transformers {runs['hf-streamer'][0]['ids']} vs ours "
                           f"{runs['ours'][0]['ids']}")
    result["same_tokens"] = True  # checked just above: the run fails otherwise
    result["prompt_tokens"] = len(prompt_ids)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
