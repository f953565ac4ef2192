"""Stage 2, formats: one parsed row (a JSON value) in, chat messages or plain text out, or the reason it is unusable.

Formats (auto-detected from the field names; ``DataConfig.fields`` renames them, e.g.
``{"instruction": "prompt", "output": "completion"}``):

=============== ================================================= =====================================
format          fields                                            trained tokens
=============== ================================================= =====================================
instruction     ``instruction``, optional ``input``, ``output``  the output
conversation    ``messages: [{role, content}]`` or ShareGPT's     every assistant turn
                ``conversations: [{from, value}]``
qa              ``question``, ``answer``                          the answer
classification  ``text``, ``label``                               the label, as the assistant's reply
text            ``text``                                          every token (continued pre-training)
=============== ================================================= =====================================

``detect_format`` takes the first rows and gives the format most of them match. ``to_messages`` takes one row
and gives chat messages ``[{role, content}]`` (every format but text) or the string (text), or raises
``DataError`` with the reason: missing field, wrong type, empty, not UTF-8, bad role, no assistant turn.

The user turn of an instruction row is ``instruction`` alone, or ``instruction + "\\n\\n" + input`` when
``input`` is not empty. ShareGPT roles ``human``/``gpt`` (also ``model``, ``bot``, ``chatgpt``) map to
``user``/``assistant``; a top-level ``system`` string becomes the system turn. Messages after the last
assistant turn train nothing and are dropped.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from .read import DataError, kind

FORMATS = ("instruction", "conversation", "qa", "classification", "text")
DETECT_ROWS = 1000  # rows looked at by detect_format

# canonical fields of each format: (required, optional)
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "conversation": (("messages",), ()),  # or "conversations" (ShareGPT)
    "qa": (("question", "answer"), ()),
    "classification": (("text", "label"), ()),
    "text": (("text",), ()),
}
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}
EXPECTED = (
    "instruction/output (instruction), messages or conversations (conversation), question/answer (qa), "
    "text/label (classification) or text (plain text)"
)
FIELD_NAMES = ("instruction", "input", "output", "messages", "conversations", "role", "content", "from", "value",
               "system", "question", "answer", "text", "label")


def check_fields(fields: dict[str, str] | None) -> None:
    """DataError unless ``fields`` maps known canonical names to non-empty strings."""
    for canonical, actual in (fields or {}).items():
        if canonical not in FIELD_NAMES:
            raise DataError(
                f"DataConfig.fields renames an unknown field '{canonical}'; known fields: {', '.join(FIELD_NAMES)}."
            )
        if not isinstance(actual, str) or not actual:
            raise DataError(f"DataConfig.fields['{canonical}'] must be a non-empty field name, got {actual!r}.")


def _key(fields: dict[str, str] | None, name: str) -> str:
    """The field name a row uses for the canonical ``name``."""
    return (fields or {}).get(name, name)


def _row_format(row: dict, fields: dict[str, str] | None) -> str | None:
    has = lambda name: _key(fields, name) in row  # noqa: E731
    if has("messages") or has("conversations"):
        return "conversation"
    if has("instruction") and has("output"):
        return "instruction"
    if has("question") and has("answer"):
        return "qa"
    if has("text") and has("label"):
        return "classification"
    if has("text"):
        return "text"
    return None


def detect_format(rows: Iterable[Any], fields: dict[str, str] | None = None) -> str:
    """The format most of the first DETECT_ROWS object rows match; DataError when none matches."""
    check_fields(fields)
    votes: dict[str, int] = {}
    seen: dict[str, int] = {}
    n = 0
    for row in rows:
        if not isinstance(row, dict):
            continue
        fmt = _row_format(row, fields)
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
        for k in list(row)[:20]:
            seen[k] = seen.get(k, 0) + 1
        n += 1
        if n >= DETECT_ROWS:
            break
    if not votes:
        keys = ", ".join(sorted(seen, key=lambda k: -seen[k])[:8]) or "none"
        raise DataError(
            f"Could not detect the dataset format: the rows have the fields {keys}; expected {EXPECTED}. "
            f"Rename fields with DataConfig.fields, e.g. {{'instruction': 'prompt', 'output': 'completion'}}."
        )
    return max(FORMATS, key=lambda f: (votes.get(f, 0), -FORMATS.index(f)))


def _is_empty(s: str) -> bool:
    return not s or s.isspace()


def _string(row: dict, fields: dict[str, str] | None, name: str, optional: bool = False) -> str:
    key = _key(fields, name)
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise DataError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"field '{key}' must be a string, got {kind(value)}")
    if _is_empty(value) and not optional:
        raise DataError(f"field '{key}' is empty")
    _check_utf8(value, f"field '{key}'")
    return value


def _check_utf8(s: str, where: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where} is not valid UTF-8 (it holds an unpaired surrogate such as \\ud800)") from None


def _conversation(row: dict, fields: dict[str, str] | None) -> list[dict]:
    key = _key(fields, "messages")
    if key not in row and _key(fields, "conversations") in row:
        key = _key(fields, "conversations")
    turns = row.get(key)
    if not isinstance(turns, list):
        raise DataError(f"field '{key}' must be a list of messages, got {kind(turns)}")
    if not turns:
        raise DataError(f"field '{key}' is empty")
    role_keys = (_key(fields, "role"), _key(fields, "from"))
    content_keys = (_key(fields, "content"), _key(fields, "value"))
    messages: list[dict] = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise DataError(f"message {i} must be an object, got {kind(turn)}")
        rk = next((k for k in role_keys if k in turn), None)
        ck = next((k for k in content_keys if k in turn), None)
        if rk is None:
            raise DataError(f"message {i} has no '{role_keys[0]}' (or ShareGPT '{role_keys[1]}')")
        if ck is None:
            raise DataError(f"message {i} has no '{content_keys[0]}' (or ShareGPT '{content_keys[1]}')")
        raw_role, content = turn[rk], turn[ck]
        role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError(
                f"message {i} has role {raw_role!r}: expected system, user or assistant (ShareGPT: human, gpt)"
            )
        if role == "system" and messages:
            raise DataError(f"message {i} is a system message: it may only come first")
        if not isinstance(content, str):
            raise DataError(f"message {i} '{ck}' must be a string, got {kind(content)}")
        if _is_empty(content):
            raise DataError(f"message {i} is empty")
        _check_utf8(content, f"message {i}")
        messages.append({"role": role, "content": content})
    system = row.get(_key(fields, "system"))
    if isinstance(system, str) and not _is_empty(system) and messages[0]["role"] != "system":
        _check_utf8(system, "field 'system'")
        messages.insert(0, {"role": "system", "content": system})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("no assistant turn to train on")
    return messages[: last + 1]


def to_messages(row: Any, fmt: str, fields: dict[str, str] | None = None) -> list[dict] | str:
    """Chat messages [{role, content}] for one row, or the plain string for fmt 'text'.

    Raises DataError with the reason (missing field, wrong type, empty, not UTF-8, bad role, no assistant turn).
    """
    if not isinstance(row, dict):
        raise DataError(f"the row is {kind(row)}, not an object")
    if fmt == "text":
        return _string(row, fields, "text")
    if fmt == "conversation":
        return _conversation(row, fields)
    if fmt == "instruction":
        prompt = _string(row, fields, "instruction")
        extra = _string(row, fields, "input", optional=True)
        if not _is_empty(extra):
            prompt = f"{prompt}\n\n{extra}"
        reply = _string(row, fields, "output")
    elif fmt == "qa":
        prompt, reply = _string(row, fields, "question"), _string(row, fields, "answer")
    elif fmt == "classification":
        prompt = _string(row, fields, "text")
        key = _key(fields, "label")
        if key not in row:
            raise DataError(f"missing field '{key}'")
        label = row[key]
        if isinstance(label, (bool, int, float)):
            label = json.dumps(label)
        elif not isinstance(label, str):
            raise DataError(f"field '{key}' must be a string or a number, got {kind(label)}")
        if _is_empty(label):
            raise DataError(f"field '{key}' is empty")
        _check_utf8(label, f"field '{key}'")
        reply = label
    else:
        raise DataError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def describe(fmt: str) -> str:
    """What a valid row of ``fmt`` holds, for error messages."""
    if fmt == "conversation":
        return (
            "messages: [{role, content}] with at least one assistant turn, or ShareGPT conversations: [{from, value}]"
        )
    required, optional = FORMAT_FIELDS[fmt]
    return " and ".join(f"'{f}'" for f in required) + (
        f" (optional {', '.join(repr(f) for f in optional)})" if optional else ""
    ) + " as non-empty strings"
