"""Stage 1, read: a file path in, (row number, parsed JSON value, problem) triples out.

Takes a ``.json`` file (an array of rows, or JSON Lines saved as ``.json``) or a ``.jsonl`` file (one value per
line; blank lines are skipped but keep the numbering). Gives every row as ``(row, value, None)``, or
``(row, None, reason)`` when a ``.jsonl`` line is not JSON: one bad line does not lose the file. Row numbers are
1-based: the line number in a ``.jsonl`` file, the element index + 1 in a ``.json`` array.

File-level problems raise ``DataError`` with one sentence naming the file: missing, a folder, empty, over
``max_bytes`` (checked before reading), binary, not UTF-8 (with the byte and line), a broken or empty ``.json``
array, or an array holding no object at all.

Bounds. Big files are not held in memory as Python objects: ``.jsonl`` is read line by line, and a ``.json``
array over ``STREAM_BYTES`` is decoded element by element from ``CHUNK``-sized reads (memory ~ one element +
one chunk; smaller arrays go through ``json.loads`` whole, which is faster). When the streaming decoder meets
anything it does not accept (bad UTF-8, bad JSON, text after the closing bracket) the whole file is parsed once
with ``json.loads``, the reference, which raises the exact error message: streaming changes memory use, never
what is accepted or reported (a consumer may just have seen rows before the error).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from typing import Any, Iterator

STREAM_BYTES = 16 << 20  # .json arrays up to this size are parsed whole (faster); bigger ones are streamed
CHUNK = 1 << 20  # bytes per read of a streamed .json array
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace, as json.decoder.WHITESPACE
_SEP = re.compile(r"[ \t\n\r]*([,\]])")  # what may follow an array element
_DECODER = json.JSONDecoder()


class DataError(ValueError):
    """A dataset problem, as one sentence meant for the user."""


def noun(value: Any) -> str:
    """The JSON name of a value's type: object, list, string, boolean, null or number."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def kind(value: Any) -> str:
    """noun() with its article: "an object", "a number", "null"."""
    n = noun(value)
    return n if n == "null" else ("an " if n[0] in "ao" else "a ") + n


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


def iter_values(path: str | os.PathLike, max_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row number, parsed value, problem) for every row; problem is a reason when the row is not JSON.

    File-level problems raise DataError (see the module docstring).
    """
    name, size, head = _check_file(path, max_bytes)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if first == b"[" and size > STREAM_BYTES:
        yield from _iter_array(path, name)
        return
    if first == b"[" or (suffix == ".json" and first != b"{"):  # small, or not an array: the reference parser
        for i, value in enumerate(_load_array(path, name)):
            yield i + 1, value, None
        return
    if suffix == ".json":  # starts with "{": one object, or JSON Lines saved as .json
        value = _parse_whole(path, name, several_ok=True)
        if value is not _SEVERAL:
            raise _fail_file(
                name, f"holds {kind(value)}, not a list of objects: expected [{{...}}, {{...}}] or one object per line."
            )
    yield from _iter_lines(path, name)


_SEVERAL = object()  # _parse_whole's answer for a file of several JSON values (JSON Lines saved as .json)


def _parse_whole(path: str | os.PathLike, name: str, several_ok: bool = False) -> Any:
    """The whole file through json.loads, with the file-level errors (not UTF-8, not JSON, nested too deeply).
    With ``several_ok``, text that holds more than one value gives _SEVERAL instead of an error."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _utf8_error(name, e, data) from None
    except RecursionError:
        raise _fail_file(name, "is nested too deeply to be a list of rows.") from None
    except json.JSONDecodeError as e:
        if several_ok and e.msg.startswith("Extra data"):
            return _SEVERAL
        raise _fail_file(name, f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None


def _load_array(path: str | os.PathLike, name: str) -> list:
    """The whole file through json.loads: the reference for what a .json array file may hold, and its errors."""
    value = _parse_whole(path, name)
    if not isinstance(value, list):
        raise _fail_file(name, f"holds {kind(value)}, not a list of objects.")
    if not value:
        raise _fail_file(name, "holds an empty list: there are no rows.")
    if not any(isinstance(v, dict) for v in value):
        raise _fail_file(name, f"is a list of {noun(value[0])}s, not a list of objects.")
    return value


class _Malformed(Exception):
    """The streaming decoder gives up; the reference parser will say why."""


def _stream_array(path: str | os.PathLike) -> Iterator[Any]:
    """The elements of a top-level JSON array, decoded from CHUNK-sized reads; _Malformed on anything odd.

    An element counts once the "," or "]" after it is in the buffer (so a number cut by a read is never taken
    for a shorter one); until then more is read, at least as much as is buffered (linear time for huge rows).
    """
    decode = codecs.getincrementaldecoder("utf-8-sig")().decode
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False

        def more() -> None:  # append the next read to buf, dropping what was consumed
            nonlocal buf, pos, eof
            raw = f.read(max(CHUNK, len(buf) - pos))
            eof = not raw
            try:
                buf = buf[pos:] + decode(raw, final=eof)
            except UnicodeDecodeError:
                raise _Malformed from None
            pos = 0

        def peek() -> str:  # skip whitespace; the next character, "" at the end of the file
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return buf[pos : pos + 1]
                more()

        if peek() != "[":
            raise _Malformed
        pos += 1
        if peek() == "]":  # "[]" is valid JSON; _iter_array reports it as no rows
            pos += 1
        else:
            while True:
                pos = _WS.match(buf, pos).end()
                try:
                    value, end = _DECODER.raw_decode(buf, pos)
                    sep = _SEP.match(buf, end)
                except (json.JSONDecodeError, RecursionError):  # a cut or a broken value; "]" after a trailing ","
                    sep = None
                if sep is None:
                    if eof:
                        raise _Malformed
                    more()
                    continue
                yield value
                pos = sep.end()
                if sep.group(1) == "]":
                    break
        if peek() != "":
            raise _Malformed  # text after the array: json.loads's "Extra data"


def _iter_array(path: str | os.PathLike, name: str) -> Iterator[tuple[int, Any, None]]:
    """The elements of a .json array as rows, streamed; the same checks and errors as _load_array."""
    held: list | None = []  # leading non-objects, held until an object shows this is a list of objects
    n = 0
    try:
        for value in _stream_array(path):
            n += 1
            if held is not None:
                if not isinstance(value, dict):
                    held.append(value)
                    continue
                yield from ((i + 1, v, None) for i, v in enumerate(held))
                held = None
            yield n, value, None
    except _Malformed:
        values = _load_array(path, name)  # raises the reference error; if it does not, go on from there
        yield from ((i + 1, values[i], None) for i in range(0 if held is not None else n, len(values)))
        return
    if n == 0:
        raise _fail_file(name, "holds an empty list: there are no rows.")
    if held is not None:
        raise _fail_file(name, f"is a list of {noun(held[0])}s, not a list of objects.")


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
    for row, value, problem in iter_values(path, max_bytes):
        if problem is not None:
            raise DataError(f"{name} line {row} is {problem}.")
        if not isinstance(value, dict):
            raise DataError(f"{name} row {row} is {kind(value)}, not an object: expected a list of objects.")
        rows.append(value)
    return rows
