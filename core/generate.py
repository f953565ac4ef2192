"""Streaming generation for the base model and any method, with the KV cache, and a bank of switchable adapters.

    settings = GenerationSettings(temperature=0.0, max_new_tokens=64, system="You are terse.")
    for delta in stream(model, tokenizer, method, [{"role": "user", "content": "Hi"}], settings):
        print(delta, end="", flush=True)

The conversation (system prompt + multi-turn history) is rendered with ``core.data.chat_prompt``, exactly as
training rendered it, up to the assistant's turn. Decoding runs the recipe of core.methods.virtual_tokens:

    step = prefill(model, method, ids)           # the prompt once; prompt/prefix methods put their m virtual
                                                 # positions in front (inputs or KV cache)
    loop: tok = pick(step.logits)                # (1, 1): greedy when temperature == 0, else top-p sampling
          step = decode_step(model, tok, step)   # one token; the cache and the mask grow by one

Sampling: p = softmax(logits / temperature); top-p keeps the smallest set of most likely tokens whose
probability reaches ``top_p`` and renormalises. Generation stops at eos / ``<|im_end|>`` or after
``max_new_tokens``. A prompt longer than the model's context (minus the virtual tokens and the tokens to
generate) keeps its most recent tokens; ``TextStream.notice`` says so.

``AdapterBank`` keeps one base model in memory and any number of trained adapters, and switches per request:
the active method is removed (which puts every base weight back, bit for bit: LoRA/adapters unwrap their
layers, prompt methods drop their table, full/freeze/FishMask/BitFit restore the tensors they edited) and the
requested one applied with its saved tensors. Requests are served one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .blocks import model_shape
from .checkpoint import ADAPTER_WEIGHTS, check_base, read_sidecar
from .config import Validated, knob
from .data import chat_prompt
from .methods import Method, build_method, method_config
from .methods.virtual_tokens import decode_step, prefill

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")
_CHARS_PER_TOKEN_CAP = 32  # a message longer than context·32 characters cannot fit anyway: cut before tokenising


@dataclass
class GenerationSettings(Validated):
    max_new_tokens: int = knob(256, "Most tokens to generate.", min=1, max=32768)
    temperature: float = knob(0.7, "Sampling temperature; 0 = greedy (always the most likely token).", min=0.0, max=5.0)
    top_p: float = knob(
        0.9, "Nucleus sampling: sample from the smallest set of tokens whose probability reaches this.", gt=0.0, max=1.0
    )
    system: str = knob("", "System prompt (empty = the chat template's default).")
    seed: int = knob(-1, "Sampling seed (-1 = not fixed).", min=-1)


class TextStream:
    """An iterator of text deltas, plus what happened: prompt size, truncation, why generation stopped."""

    def __init__(self) -> None:
        self.prompt_ids: list[int] = []  # what the model was fed (after any truncation)
        self.token_ids: list[int] = []  # generated so far, stop token excluded
        self.prompt_tokens = 0
        self.dropped_tokens = 0  # prompt tokens cut off to fit the context
        self.new_tokens = 0
        self.finish_reason = ""  # "stop" (eos) or "length"
        self.notice = ""  # one sentence for the user when the prompt was truncated
        self._gen: Iterator[str] = iter(())

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        close = getattr(self._gen, "close", None)
        if close:
            close()


def stream(
    model: nn.Module,
    tokenizer,
    method: Method | None,
    messages: list[dict[str, str]],
    settings: GenerationSettings | None = None,
) -> TextStream:
    """Text deltas of the assistant's reply to ``messages`` ([{role, content}], oldest first)."""
    settings = settings or GenerationSettings()
    check_messages(messages)
    out = TextStream()
    ids = _prompt_ids(model, tokenizer, method, messages, settings, out)
    out.prompt_ids = ids
    out._gen = _decode(model, tokenizer, method, ids, settings, out)
    return out


def generate(model, tokenizer, method: Method | None, messages, settings: GenerationSettings | None = None) -> str:
    """The whole reply at once (the same tokens as ``stream``)."""
    return "".join(stream(model, tokenizer, method, messages, settings))


def check_messages(messages: list[dict[str, str]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}, got {m!r:.80}")
    if messages[-1]["role"] == "user" and not messages[-1]["content"].strip():
        raise ValueError("the prompt is empty: write a message first")


def _prompt_ids(model, tokenizer, method, messages, settings: GenerationSettings, out: TextStream) -> list[int]:
    """Render the conversation and fit it, the virtual tokens and the reply into the model's context."""
    context = model_shape(model).max_positions
    m = method.num_virtual_tokens if method is not None else 0
    cap = context * _CHARS_PER_TOKEN_CAP
    cut = [dict(msg, content=msg["content"][-cap:]) for msg in messages]
    ids = chat_prompt(tokenizer, cut, settings.system)
    out.prompt_tokens = len(ids)
    room = context - m - settings.max_new_tokens
    if room < 1:
        raise ValueError(
            f"GenerationSettings.max_new_tokens = {settings.max_new_tokens} is invalid: the model's context is "
            f"{context} tokens{f' ({m} of them virtual)' if m else ''}"
        )
    chars_cut = any(len(a["content"]) != len(b["content"]) for a, b in zip(messages, cut))
    if len(ids) > room or chars_cut:
        out.dropped_tokens = max(0, len(ids) - room)
        ids = ids[-room:]
        out.notice = (
            f"The prompt is longer than the model's context ({context} tokens, {settings.max_new_tokens} kept for the "
            f"reply): only its last {len(ids)} tokens were used."
        )
    return ids


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a reply: eos, the chat template's end-of-turn marker, the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in STOP_TOKENS if t in vocab)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return ids


def pick(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token (B, 1) from logits (B, V): argmax when temperature == 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # tokens after the nucleus is already full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


def _decode(model, tokenizer, method, ids: list[int], settings: GenerationSettings, out: TextStream) -> Iterator[str]:
    """Prefill, then one token at a time; yields the new text (a token may end mid-character: held back)."""
    device = next(model.parameters()).device
    generator = None
    if settings.seed >= 0 and settings.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    stops = stop_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        step = prefill(model, method, torch.tensor([ids], device=device))
        new = out.token_ids
        sent = ""
        out.finish_reason = "length"
        while len(new) < settings.max_new_tokens:
            tok = pick(step.logits, settings.temperature, settings.top_p, generator)  # (1, 1)
            t = int(tok)
            if t in stops:
                out.finish_reason = "stop"
                break
            new.append(t)
            out.new_tokens = len(new)
            text = tokenizer.decode(new, skip_special_tokens=True)
            if len(text) > len(sent) and not text.endswith("\ufffd"):  # hold back half a UTF-8 character
                yield text[len(sent) :]
                sent = text
            if len(new) < settings.max_new_tokens:
                step = decode_step(model, tok, step)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if len(text) > len(sent):
            yield text[len(sent) :]
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# Several adapters on one base model


@dataclass
class _Saved:
    folder: Path
    method_name: str
    config: Any
    tensors: dict[str, Tensor]  # CPU


def adapter_folder(path: str | Path) -> Path:
    """A run folder (its ``adapter/``) or an adapter folder itself."""
    path = Path(path)
    return path / "adapter" if (path / "adapter").is_dir() and not (path / ADAPTER_WEIGHTS).exists() else path


class AdapterBank:
    """One base model in memory, many adapters by name, one active per request."""

    def __init__(self, model: nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._saved: dict[str, _Saved] = {}
        self._active: tuple[str, Method] | None = None
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._saved)

    @property
    def active(self) -> str | None:
        return self._active[0] if self._active else None

    def add(self, name: str, path: str | Path) -> None:
        """Register the adapter at ``path`` (a run folder or an adapter folder) under ``name``.

        The tensors are read once, into CPU memory; the adapter is applied once to check it fits the model."""
        if not name:
            raise ValueError("adapter name must not be empty")
        folder = adapter_folder(path)
        sidecar = read_sidecar(folder)
        check_base(self.model, sidecar, folder)
        try:
            tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"adapter folder {folder} is corrupt: {ADAPTER_WEIGHTS} cannot be read ({e})") from None
        config = method_config(sidecar["method"], sidecar.get("method_config"))
        saved = _Saved(folder, sidecar["method"], config, tensors)
        with self._lock:
            if self.active == name:
                self._switch(None)
            previous = self._saved.get(name)
            self._saved[name] = saved
            try:
                self._switch(name)  # fails here, with a clear message, if the adapter does not fit
            except Exception:
                if previous is None:
                    del self._saved[name]
                else:
                    self._saved[name] = previous
                raise

    def remove(self, name: str) -> None:
        with self._lock:
            if self.active == name:
                self._switch(None)
            self._saved.pop(name, None)

    def use(self, name: str | None) -> Method | None:
        """Make ``name`` (None = the plain base model) the active adapter and return its method."""
        with self._lock:
            return self._switch(name)

    def stream(self, name: str | None, messages, settings: GenerationSettings | None = None) -> Iterator[str]:
        """Text deltas of the reply of adapter ``name`` (None = base). Holds the bank until the reply is done."""
        with self._lock:
            method = self._switch(name)
            yield from stream(self.model, self.tokenizer, method, messages, settings)

    def generate(self, name: str | None, messages, settings: GenerationSettings | None = None) -> str:
        return "".join(self.stream(name, messages, settings))

    def _switch(self, name: str | None) -> Method | None:
        if name is not None and name not in self._saved:
            raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(self._saved) or 'none'}")
        if self.active == name and name is not None:
            return self._active[1]  # type: ignore[index]
        if self._active is not None:
            self._active[1].remove(self.model)
            self._active = None
        if name is None:
            return None
        saved = self._saved[name]
        method = build_method(saved.config)
        method.apply(self.model)
        try:
            method.load_adapter_tensors(self.model, saved.tensors)
        except ValueError as e:
            method.remove(self.model)
            raise ValueError(f"adapter {saved.folder}: {e}") from None
        self.model.requires_grad_(False)
        self.model.eval()
        self._active = (name, method)
        return method


__all__ = ["AdapterBank", "GenerationSettings", "TextStream", "generate", "pick", "stop_ids", "stream"]
