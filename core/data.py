"""Datasets: read JSON/JSONL, detect the format, validate every row, render through the chat template, mask the
prompt, split, and batch without spending compute on padding.

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

Every non-text row becomes chat messages. The user turn of an instruction row is ``instruction`` alone, or
``instruction + "\\n\\n" + input`` when ``input`` is not empty. ShareGPT roles ``human``/``gpt`` (also
``model``, ``bot``, ``chatgpt``) map to ``user``/``assistant``; a top-level ``system`` string becomes the
system turn. Messages after the last assistant turn train nothing and are dropped.

Rendering and masking. With a chat template (SmolLM2 has ChatML) the conversation is rendered once with each
assistant content replaced by a unique placeholder; the placeholders are then swapped back for the real
contents, which gives the exact character span of every assistant reply. The span is extended over the
template's end-of-turn marker (``<|im_end|>`` for ChatML: the special token the template writes right after an
assistant reply), so the model learns to stop; the newline after it is not trained. A template that writes
nothing after a reply gets the tokenizer's eos token appended there, trained. The whole text is
tokenised once (``add_special_tokens=False``: the template writes its own special tokens), so ``input_ids``
equal ``apply_chat_template(messages, tokenize=True)``, and a token is trained iff its first character lies
inside an assistant span (offset mapping; slow tokenisers fall back to tokenising span by span). ``labels[t]``
is ``input_ids[t]`` where trained and -100 elsewhere; the shift by one happens in ``core.forward``.
``DataConfig.system_prompt`` is prepended as a system turn unless the row has its own; empty means the
template's default (SmolLM2 adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face").

Without a chat template, this plain template is used (trained parts marked with ^)::

    {bos}### System:\\n{system}\\n\\n          (only with a system prompt; {bos} only if the tokenizer adds one)
    ### User:\\n{user}\\n\\n
    ### Assistant:\\n{assistant}{eos}\\n\\n
                   ^^^^^^^^^^^^^^^^^
Plain text rows are ``{bos}{text}{eos}``, all trained. ``chat_prompt`` renders a conversation up to the point
where the assistant replies, the same way, so generation sees exactly what training saw.

Bounds. Files over ``max_bytes`` are refused before reading. ``.jsonl`` is streamed line by line and
``validate_file`` never tokenises, so a million rows validate in seconds. Before rendering, every string is
cut to ``(max_len + 2) * (longest vocabulary entry)`` characters, which still yields more than ``max_len``
tokens, so a 10 MB string costs no more than a long one. Rows longer than ``max_len`` tokens are truncated on
the right and listed in ``DataReport.truncated_rows``; a row with nothing left to train after truncation is an
issue.
"""

from __future__ import annotations

import json
import math
import os
import random
import weakref
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from .config import DataConfig

IGNORE = -100  # same value as core.forward.IGNORE (not imported: core.forward pulls in the methods)
FORMATS = ("instruction", "conversation", "qa", "classification", "text")
MAX_ISSUES = 1000  # issues kept in a report; the count of invalid rows is always total_rows - valid_rows
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


class DataError(ValueError):
    """A dataset problem, as one sentence meant for the user."""


@dataclass
class RowIssue:
    row: int  # 1-based: the line number in a .jsonl file, the element index + 1 in a .json array
    reason: str


@dataclass
class DataReport:
    path: str
    format: str
    total_rows: int
    valid_rows: int
    issues: list[RowIssue] = field(default_factory=list)  # the first MAX_ISSUES problems
    truncated_rows: list[int] = field(default_factory=list)  # rows cut to max_len (still used)

    @property
    def invalid_rows(self) -> int:
        return self.total_rows - self.valid_rows

    def summary(self, max_issues: int = 5) -> str:
        name = os.path.basename(self.path) or self.path
        lines = [
            f"{name}: {self.format} format, {self.total_rows} rows, {self.valid_rows} valid, "
            f"{self.invalid_rows} skipped."
        ]
        if self.truncated_rows:
            shown = ", ".join(map(str, self.truncated_rows[:10]))
            more = ", ..." if len(self.truncated_rows) > 10 else ""
            lines.append(
                f"{len(self.truncated_rows)} rows are longer than max_len and were truncated (rows {shown}{more})."
            )
        for issue in self.issues[:max_issues]:
            lines.append(f"  row {issue.row}: {issue.reason}")
        if self.invalid_rows > max_issues:
            lines.append(f"  ... and {self.invalid_rows - max_issues} more skipped rows.")
        return "\n".join(lines)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; the token id where trained, IGNORE where masked


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: Tensor  # (B, T) long, 0 on padding
    labels: Tensor  # (B, T) long, IGNORE on prompt and padding

    def n_supervised(self) -> int:
        """Tokens that are predicted: labels[:, 1:] != IGNORE, the same shift as core.forward.supervised_loss."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


# --------------------------------------------------------------------------------------------------------------
# Reading


def _fail_file(name: str, what: str) -> DataError:
    return DataError(f"{name} {what}")


def _check_file(path: str | os.PathLike, max_bytes: int) -> tuple[str, int, bytes]:
    """(display name, size, first bytes) after the checks every file needs."""
    name = os.path.basename(os.fspath(path)) or os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DataError(f"Cannot read {name}: the file does not exist or is not accessible.") from None
    if os.path.isdir(path):
        raise DataError(f"{name} is a folder, not a .json or .jsonl file.")
    if size == 0:
        raise _fail_file(name, "is empty (0 bytes).")
    if size > max_bytes:
        raise _fail_file(
            name, f"is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.1f} MB limit (DataConfig.max_bytes)."
        )
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise _fail_file(name, "looks like a binary file, not JSON text.")
    return name, size, head


def _utf8_error(name: str, err: UnicodeDecodeError, data: bytes, line: int | None = None) -> DataError:
    line = line if line is not None else data[: err.start].count(b"\n") + 1
    return _fail_file(
        name, f"is not valid UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); re-save it as UTF-8."
    )


def _noun(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _kind(value: Any) -> str:
    noun = _noun(value)
    return noun if noun == "null" else ("an " if noun[0] in "ao" else "a ") + noun


def _iter_raw(path: str | os.PathLike, max_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row number, parsed value, problem) for every row; problem is a reason when the row is not JSON.

    File-level problems (missing, empty, binary, too big, not UTF-8, a broken .json array) raise DataError.
    A malformed line of a .jsonl file is a row problem, so one bad line does not lose the file.
    """
    name, _, head = _check_file(path, max_bytes)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if first == b"[" or (suffix == ".json" and first != b"{"):
        yield from _iter_array(path, name)
        return
    if suffix == ".json":  # starts with "{": one object, or JSON Lines saved as .json
        with open(path, "rb") as f:
            data = f.read()
        try:
            value = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise _utf8_error(name, e, data) from None
        except RecursionError:
            raise _fail_file(name, "is nested too deeply to be a list of rows.") from None
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise _fail_file(name, f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
        else:
            raise _fail_file(
                name,
                f"holds {_kind(value)}, not a list of objects: expected [{{...}}, {{...}}] or one object per line.",
            )
        del data
    yield from _iter_lines(path, name)


def _iter_array(path: str | os.PathLike, name: str) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _utf8_error(name, e, data) from None
    except json.JSONDecodeError as e:
        raise _fail_file(name, f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    except RecursionError:
        raise _fail_file(name, "is nested too deeply to be a list of rows.") from None
    del data
    if not isinstance(value, list):
        raise _fail_file(name, f"holds {_kind(value)}, not a list of objects.")
    if not value:
        raise _fail_file(name, "holds an empty list: there are no rows.")
    if not any(isinstance(v, dict) for v in value):
        raise _fail_file(name, f"is a list of {_noun(value[0])}s, not a list of objects.")
    for i, v in enumerate(value):
        yield i + 1, v, None


def _iter_lines(path: str | os.PathLike, name: str) -> Iterator[tuple[int, Any, str | None]]:
    rows = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(name, e, raw, lineno) from None
            if not line.strip():
                continue
            rows += 1
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON: {e.msg} at column {e.colno}"
            except RecursionError:
                yield lineno, None, "not valid JSON: nested too deeply"
    if rows == 0:
        raise _fail_file(name, "contains no rows (only blank lines).")


def read_rows(path: str | os.PathLike, max_bytes: int = 200 * 1024 * 1024) -> list[dict]:
    """All rows of a .json array or a .jsonl file, strictly: any row that is not a JSON object raises DataError."""
    rows = []
    name = os.path.basename(os.fspath(path))
    for row, value, problem in _iter_raw(path, max_bytes):
        if problem is not None:
            raise DataError(f"{name} line {row} is {problem}.")
        if not isinstance(value, dict):
            raise DataError(f"{name} row {row} is {_kind(value)}, not an object: expected a list of objects.")
        rows.append(value)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Detecting and validating


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
        raise DataError(f"field '{key}' must be a string, got {_kind(value)}")
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
        raise DataError(f"field '{key}' must be a list of messages, got {_kind(turns)}")
    if not turns:
        raise DataError(f"field '{key}' is empty")
    role_keys = (_key(fields, "role"), _key(fields, "from"))
    content_keys = (_key(fields, "content"), _key(fields, "value"))
    messages: list[dict] = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise DataError(f"message {i} must be an object, got {_kind(turn)}")
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
            raise DataError(f"message {i} '{ck}' must be a string, got {_kind(content)}")
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
        raise DataError(f"the row is {_kind(row)}, not an object")
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
            raise DataError(f"field '{key}' must be a string or a number, got {_kind(label)}")
        if _is_empty(label):
            raise DataError(f"field '{key}' is empty")
        _check_utf8(label, f"field '{key}'")
        reply = label
    else:
        raise DataError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def validate_file(
    path: str | os.PathLike,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    max_bytes: int = 200 * 1024 * 1024,
) -> DataReport:
    """Read, detect and validate every row without tokenising (fast: the upload check).

    Streams .jsonl files; keeps only counts and the first MAX_ISSUES issues. DataError if no row is valid.
    """
    check_fields(fields)
    head: list[Any] = []
    it = _iter_raw(path, max_bytes)
    for item in it:  # the first rows decide the format
        head.append(item)
        if len(head) >= DETECT_ROWS:
            break
    if fmt == "auto":
        fmt = detect_format((v for _, v, p in head if p is None), fields)
    report = DataReport(os.fspath(path), fmt, 0, 0, [], [])
    for row, value, problem in _chain(head, it):
        report.total_rows += 1
        if problem is None:
            try:
                to_messages(value, fmt, fields)
            except DataError as e:
                problem = str(e)
        if problem is None:
            report.valid_rows += 1
        elif len(report.issues) < MAX_ISSUES:
            report.issues.append(RowIssue(row, problem))
    _require_valid(report)
    return report


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def _require_valid(report: DataReport) -> None:
    if report.valid_rows:
        return
    name = os.path.basename(report.path)
    first = "; ".join(f"row {i.row}: {i.reason}" for i in report.issues[:3])
    raise DataError(
        f"{name} has no valid rows for the {report.format} format (expected {_describe(report.format)}); "
        f"first problems: {first}."
    )


def _describe(fmt: str) -> str:
    if fmt == "conversation":
        return (
            "messages: [{role, content}] with at least one assistant turn, or ShareGPT conversations: [{from, value}]"
        )
    required, optional = FORMAT_FIELDS[fmt]
    return " and ".join(f"'{f}'" for f in required) + (
        f" (optional {', '.join(repr(f) for f in optional)})" if optional else ""
    ) + " as non-empty strings"


# --------------------------------------------------------------------------------------------------------------
# Rendering and tokenising


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


def _encode_many(
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
    result = _encode_many(tokenizer, [messages_or_text], max_len, system_prompt)[0]
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


def load_examples(cfg: DataConfig, tokenizer: Any, max_len: int, chunk: int = 1024) -> tuple[list[Example], DataReport]:
    """Tokenised examples of every valid row, and the report. Bad rows are reported, not fatal.

    DataError when the file cannot be read, its format cannot be detected, or no row is valid.
    """
    check_fields(cfg.fields)
    head: list[Any] = []
    it = _iter_raw(cfg.path, cfg.max_bytes)
    for item in it:
        head.append(item)
        if len(head) >= DETECT_ROWS:
            break
    fmt = cfg.format if cfg.format != "auto" else detect_format((v for _, v, p in head if p is None), cfg.fields)
    report = DataReport(cfg.path, fmt, 0, 0, [], [])
    examples: list[Example] = []

    def issue(row: int, reason: str) -> None:
        if len(report.issues) < MAX_ISSUES:
            report.issues.append(RowIssue(row, reason))

    pending: list[tuple[int, list[dict] | str]] = []

    def flush() -> None:
        results = _encode_many(tokenizer, [item for _, item in pending], max_len, cfg.system_prompt)
        for (row, _), result in zip(pending, results):
            if isinstance(result, str):
                issue(row, result)
                continue
            example, truncated = result
            if n_trained(example) == 0:
                issue(row, f"longer than max_len={max_len} tokens, and nothing is left to train after truncation")
                continue
            if truncated:
                report.truncated_rows.append(row)
            report.valid_rows += 1
            examples.append(example)
        pending.clear()

    for row, value, problem in _chain(head, it):
        report.total_rows += 1
        if problem is None:
            try:
                pending.append((row, to_messages(value, fmt, cfg.fields)))
            except DataError as e:
                problem = str(e)
        if problem is not None:
            issue(row, problem)
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    report.issues.sort(key=lambda i: i.row)
    _require_valid(report)
    return examples, report


# --------------------------------------------------------------------------------------------------------------
# Splitting, inspecting, batching


def split(
    examples: list[Example], val_fraction: float, val_count: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val), deterministic for the seed; both keep the original order. Train keeps at least one example.

    val_count > 0 holds out exactly that many; otherwise round(val_fraction · n), at least 1 when the fraction
    is positive and there are two or more examples.
    """
    n = len(examples)
    if val_count > 0:
        n_val = val_count
    elif val_fraction > 0:
        n_val = max(1, round(val_fraction * n))
    else:
        n_val = 0
    n_val = max(0, min(n_val, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def preview(tokenizer: Any, example: Example, max_tokens: int = 400) -> list[tuple[str, bool]]:
    """Decoded runs of the example as (text, trained?), for a two-colour preview; the tail is summarised."""
    ids, labels = example.input_ids[:max_tokens], example.labels[:max_tokens]
    runs: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append((text, labels[start] != IGNORE))
            start = t
    rest = len(example.input_ids) - len(ids)
    if rest > 0:
        runs.append((f" … ({rest} more tokens)", False))
    return runs


def length_stats(examples: list[Example]) -> dict:
    """n, min, mean, p50, p90, max of the token lengths; total_tokens and supervised_tokens."""
    lengths = sorted(len(e.input_ids) for e in examples)
    n = len(lengths)
    if n == 0:
        return {"n": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "max": 0, "total_tokens": 0, "supervised_tokens": 0}
    pick = lambda q: lengths[min(n - 1, math.ceil(q * n) - 1)]  # noqa: E731 - nearest rank
    return {
        "n": n,
        "min": lengths[0],
        "mean": sum(lengths) / n,
        "p50": pick(0.5),
        "p90": pick(0.9),
        "max": lengths[-1],
        "total_tokens": sum(lengths),
        "supervised_tokens": sum(n_trained(e) for e in examples),
    }


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example: pad_id in input_ids, 0 in attention_mask, IGNORE in labels."""
    if not examples:
        raise ValueError("collate needs at least one example")
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[b, :n] = 1
    return Batch(ids, mask, labels)


class LengthGroupedBatches:
    """Batches of similar-length examples, padded only to their own longest member.

    Each epoch: shuffle the examples with Random(seed, epoch), cut the order into mega-batches of
    ``batch_size · MEGA`` examples, sort each mega-batch by length and cut it into batches, then shuffle the
    batch order, putting the batch with the longest example first (an out-of-memory shows at step 1, not late).
    Deterministic for (seed, epoch). Only the last batch of an epoch can be smaller than batch_size.
    With shuffle=False (evaluation) the examples are sorted by length once and the order never changes.
    With group=False every batch is a uniformly random draw (its rows sorted by length, longest batch still
    first): the training loop uses that on CPU, where core.forward.pieces removes the padding anyway and
    length-homogeneous batches would cost quality (they are often topic-homogeneous too).
    """

    MEGA = 50

    def __init__(
        self, examples: list[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
        group: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} is invalid: must be >= 1")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.group = group
        self.lengths = [len(e.input_ids) for e in examples]

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def plan(self, epoch: int) -> list[list[int]]:
        """The example indices of every batch of the epoch, in order."""
        n, bs = len(self.examples), self.batch_size
        if n == 0:
            return []
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: (-self.lengths[i], i))
            return [order[i : i + bs] for i in range(0, n, bs)]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        mega = bs * (self.MEGA if self.group else 1)
        batches: list[list[int]] = []
        for m in range(0, n, mega):
            group = sorted(order[m : m + mega], key=lambda i: -self.lengths[i])
            batches += [group[i : i + bs] for i in range(0, len(group), bs)]
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        first = batches.pop(longest)
        rng.shuffle(batches)
        return [first, *batches]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of one epoch; ``skip`` drops the first batches, to resume mid-epoch."""
        for idx in self.plan(epoch)[skip:]:
            yield collate([self.examples[i] for i in idx], self.pad_id)

    def padding_waste(self, epoch: int = 0) -> float:
        """Fraction of the (B, T) positions of an epoch that are padding."""
        real = padded = 0
        for idx in self.plan(epoch):
            lens = [self.lengths[i] for i in idx]
            real += sum(lens)
            padded += max(lens) * len(lens)
        return 1 - real / padded if padded else 0.0
