"""Stage 4, render and mask: chat messages or text in, token ids with labels out (``Example``), token-exact.

Takes what ``formats.to_messages`` gives (chat messages, or a string for text rows) and gives
``Example(input_ids, labels)``: ``labels[t]`` is ``input_ids[t]`` where trained and IGNORE (-100) elsewhere;
the shift by one happens in ``core.forward``.

With a chat template (SmolLM2 has ChatML) the conversation is rendered once with each assistant content
replaced by a unique placeholder; the placeholders are then swapped back for the real contents, which gives the
exact character span of every assistant reply. The span is extended over the template's end-of-turn marker
(``<|im_end|>`` for ChatML: the special token the template writes right after an assistant reply), so the model
learns to stop; the newline after it is not trained. A template that writes nothing after a reply gets the
tokenizer's eos token appended there, trained. The whole text is tokenised once (``add_special_tokens=False``:
the template writes its own special tokens), so ``input_ids`` equal ``apply_chat_template(messages,
tokenize=True)``, and a token is trained iff its first character lies inside an assistant span (offset mapping;
slow tokenisers fall back to tokenising span by span). ``system_prompt`` is prepended as a system turn unless
the row has its own; empty means the template's default (SmolLM2 adds "You are a helpful AI assistant named
SmolLM, trained by Hugging Face").

Without a chat template, this plain template is used (trained parts marked with ^)::

    {bos}### System:\\n{system}\\n\\n          (only with a system prompt; {bos} only if the tokenizer adds one)
    ### User:\\n{user}\\n\\n
    ### Assistant:\\n{assistant}{eos}\\n\\n
                   ^^^^^^^^^^^^^^^^^
Plain text rows are ``{bos}{text}{eos}``, all trained. ``chat_prompt`` renders a conversation up to the point
where the assistant replies, the same way, so generation sees exactly what training saw.

Bounds. Before rendering, every string is cut to ``(max_len + 2) * (longest vocabulary entry)`` characters,
which still yields more than ``max_len`` tokens, so a 10 MB string costs no more than a long one. Rows longer
than ``max_len`` tokens are truncated on the right (the caller is told, to list them in the report).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from .read import DataError

IGNORE = -100  # same value as core.forward.IGNORE (not imported: core.forward pulls in the methods)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; the token id where trained, IGNORE where masked


@dataclass
class _TokInfo:
    template: bool  # has a chat template
    end_marker: str  # text the template writes right after an assistant reply, trained with it
    bos: str  # prefix the tokenizer adds on its own (plain template and text rows)
    eos: str
    max_token_chars: int  # longest vocabulary entry, bounds how many characters max_len tokens can need


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no real text contains them


def _info(tokenizer: Any) -> _TokInfo:
    try:
        return _INFO[tokenizer]
    except (KeyError, TypeError):
        pass
    eos = tokenizer.eos_token or ""
    bos = ""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        bos = tokenizer.bos_token
    end_marker = ""
    template = bool(getattr(tokenizer, "chat_template", None))
    if template:
        mark = _PLACEHOLDER.format(0)
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}], tokenize=False
            )
            end_marker = _end_marker(tokenizer, text.split(mark, 1)[1])
        except Exception:  # noqa: BLE001 - a template that cannot render the probe trains no end marker
            end_marker = ""
    vocab = tokenizer.get_vocab()
    info = _TokInfo(template, end_marker, bos, eos, max(8, max(map(len, vocab)) if vocab else 8))
    try:
        _INFO[tokenizer] = info
    except TypeError:
        pass
    return info


def _end_marker(tokenizer: Any, suffix: str) -> str:
    """What ends an assistant reply: the special token right after it (with any space before it), else the
    first non-space run, else nothing."""
    rest = suffix.lstrip()
    if not rest:
        return ""
    lead = suffix[: len(suffix) - len(rest)]
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    if ids and ids[0] in special:
        return lead + tokenizer.convert_ids_to_tokens(ids[0])
    return lead + rest.split(maxsplit=1)[0]


def _render_chat(tokenizer: Any, messages: list[dict], info: _TokInfo) -> tuple[str, list[tuple[int, int]]]:
    """(text, trained character spans) for a conversation."""
    if not info.template:
        return _render_plain(messages, info)
    replies: list[str] = []
    skeleton_msgs = []
    for m in messages:
        if m["role"] == "assistant":
            skeleton_msgs.append({"role": "assistant", "content": _PLACEHOLDER.format(len(replies))})
            replies.append(m["content"])
        else:
            skeleton_msgs.append(m)
    try:
        skeleton = tokenizer.apply_chat_template(skeleton_msgs, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja raise_exception and friends
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"the model's chat template rejected this conversation: {why}") from None
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = cur = 0
    for i, reply in enumerate(replies):
        mark = _PLACEHOLDER.format(i)
        k = skeleton.find(mark, pos)
        if k < 0:
            raise DataError("the model's chat template drops assistant turn(s), so nothing can be trained")
        parts.append(skeleton[pos:k])
        cur += k - pos
        start = cur
        parts.append(reply)
        cur += len(reply)
        pos = k + len(mark)
        if info.end_marker and skeleton.startswith(info.end_marker, pos):
            parts.append(info.end_marker)
            cur += len(info.end_marker)
            pos += len(info.end_marker)
        elif not info.end_marker and info.eos:  # the template ends a reply with nothing: teach the eos token
            parts.append(info.eos)
            cur += len(info.eos)
        spans.append((start, cur))
    parts.append(skeleton[pos:])
    return "".join(parts), spans


def _render_plain(messages: list[dict], info: _TokInfo, generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The documented plain template, for tokenizers without a chat template."""
    parts = [info.bos]
    cur = len(info.bos)
    spans = []
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    for m in messages:
        head = f"### {names[m['role']]}:\n"
        parts.append(head)
        cur += len(head)
        body = m["content"] + (info.eos if m["role"] == "assistant" else "")
        if m["role"] == "assistant":
            spans.append((cur, cur + len(body)))
        parts.append(body + "\n\n")
        cur += len(body) + 2
    if generation:
        parts.append("### Assistant:\n")
    return "".join(parts), spans


def _with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _cap(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n]


def _render(tokenizer: Any, item: list[dict] | str, max_len: int, system_prompt: str, info: _TokInfo):
    cap = (max_len + 2) * info.max_token_chars
    if isinstance(item, str):
        text = info.bos + _cap(item, cap) + info.eos
        return text, [(0, len(text))]
    messages = [{"role": m["role"], "content": _cap(m["content"], cap)} for m in _with_system(item, system_prompt)]
    return _render_chat(tokenizer, messages, info)


def _tokenize(
    tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels for rendered texts: a token is trained iff its first character is in a span."""
    if getattr(tokenizer, "is_fast", False):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)  # skips the per-row dict building
            pairs = [(e.ids, e.offsets) for e in encodings]
        else:
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
        out = []
        for (ids, offsets), sp in zip(pairs, spans):
            starts = [o[0] for o in offsets]
            labels = [IGNORE] * len(ids)
            for a, b in sp:
                i, j = bisect_left(starts, a), bisect_left(starts, b)
                labels[i:j] = ids[i:j]
            out.append((list(ids), labels))
        return out
    out = []
    for text, sp in zip(texts, spans):  # slow tokenizer: tokenise piece by piece
        ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for a, b in [*sp, (len(text), len(text))]:
            for piece, trained in ((text[pos:a], False), (text[a:b], True)):
                if piece:
                    t = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += t
                    labels += t if trained else [IGNORE] * len(t)
            pos = b
        out.append((ids, labels))
    return out


def encode_many(
    tokenizer: Any, items: list[list[dict] | str], max_len: int, system_prompt: str = ""
) -> list[tuple[Example, bool] | str]:
    """encode() for many rows in one tokenizer call; a row the template rejects gives its reason instead."""
    info = _info(tokenizer)
    rendered: list[tuple[str, list] | str] = []
    for item in items:
        try:
            rendered.append(_render(tokenizer, item, max_len, system_prompt, info))
        except DataError as e:
            rendered.append(str(e))
    ok = [r for r in rendered if not isinstance(r, str)]
    tokens = iter(_tokenize(tokenizer, [t for t, _ in ok], [s for _, s in ok]) if ok else [])
    out: list[tuple[Example, bool] | str] = []
    for r in rendered:
        if isinstance(r, str):
            out.append(r)
            continue
        ids, labels = next(tokens)
        truncated = len(ids) > max_len
        out.append((Example(ids[:max_len], labels[:max_len]), truncated))
    return out


def encode(
    tokenizer: Any, messages_or_text: list[dict] | str, max_len: int, system_prompt: str = ""
) -> tuple[Example, bool]:
    """(example, truncated) for one row from to_messages(): prompt tokens masked, replies (or all text) trained."""
    result = encode_many(tokenizer, [messages_or_text], max_len, system_prompt)[0]
    if isinstance(result, str):
        raise DataError(result)
    return result


def chat_prompt(tokenizer: Any, messages: list[dict], system_prompt: str = "") -> list[int]:
    """Token ids of a conversation up to where the assistant replies: what generation feeds the model.

    Renders exactly like training (same template or plain template, same system prompt rule).
    """
    info = _info(tokenizer)
    messages = _with_system(list(messages), system_prompt)
    if info.template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text, _ = _render_plain(messages, info, generation=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def n_trained(example: Example) -> int:
    """Supervised tokens of an example: labels[1:] != IGNORE (position 0 is never predicted)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)

