"""Uploaded and bundled datasets: store an upload under a generated name, then validate and inspect it.

Uploads are only ever parsed as data (core.data: JSON, or CSV / Parquet through ``datasets``), never executed. They are copied into DATA/uploads/
under their content's hash and a sanitised copy of their name, so the user's file name never becomes a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

from core.config import DataConfig
from core.data import DataError, length_stats, load_examples, preview

from .paths import inside

EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
PREVIEWS = 12  # examples kept for the preview
MAX_LENGTHS = 20_000  # token lengths kept for the histogram


def store_upload(uploads_dir: Path, src: str | os.PathLike, original_name: str, max_bytes: int) -> tuple[Path, bool]:
    """Copy an uploaded file into ``uploads_dir`` after the checks that need no parsing; return (path, whether it
    is new). The stored name is the content's hash and the original name made safe (``<16 hex>-<name>.<ext>``),
    so the same file uploaded twice is stored once, and lists can show the name the user knows."""
    name = os.path.basename(str(original_name or src))
    stem, ext = os.path.splitext(name)
    ext = ext.lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{name}: only .json, .jsonl, .csv and .parquet files can be uploaded.")
    try:
        size = os.path.getsize(src)
    except OSError:
        raise DataError(f"{name}: the upload could not be read; try again.") from None
    if size > max_bytes:
        raise DataError(f"{name} is {size / 2**20:.1f} MB, over the upload limit of {max_bytes / 2**20:.1f} MB.")
    if size == 0:
        raise DataError(f"{name} is empty (0 bytes).")
    safe = re.sub(r"[^\w.-]+", "_", stem).strip("._").encode()[:120].decode(errors="ignore") or "data"  # bytes
    part = inside(uploads_dir, f".{secrets.token_hex(8)}.part")  # renamed when complete: never half a file
    try:
        h = hashlib.sha256()
        with open(src, "rb") as f, open(part, "wb") as out:  # one read: hashed as it is copied
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        dest = inside(uploads_dir, f"{h.hexdigest()[:16]}-{safe}{ext}")
        if dest.is_file():
            return dest, False
        os.replace(part, dest)
        return dest, True
    finally:
        part.unlink(missing_ok=True)


def shown_name(stored: Path) -> str:
    """The name the user uploaded a stored file under (store_upload's ``<16 hex>-<name>``)."""
    digest, _, rest = stored.name.partition("-")
    return rest if len(digest) == 16 and rest else stored.name


def inspect(path: Path, display_name: str, tokenizer: Any, max_len: int, max_bytes: int,
            fields: dict[str, str] | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Validate and tokenise every row (or read them from the tokenised cache in ``cache_dir``: inspecting the
    same file again with the same settings does not tokenise). Returns a plain dict (it lives in the session's
    gr.State). ``fields`` is the column mapping (DataConfig.fields).

    Raises DataError with a sentence for the user when the file cannot be used at all."""
    try:
        cfg = DataConfig(path=str(path), max_bytes=max_bytes, fields=dict(fields or {}))
        examples, report = load_examples(cfg, tokenizer, max_len, cache_dir=cache_dir)
    except DataError as e:
        raise DataError(str(e).replace(path.name, display_name)) from None
    except (ValueError, OSError, RecursionError, MemoryError) as e:  # anything else is still a bad file, not a crash
        raise DataError(f"{display_name} could not be read as a dataset: {str(e)[:200]}") from None
    lengths = [len(e.input_ids) for e in examples]
    return {
        "path": str(path),
        "name": display_name,
        "format": report.format,
        "fields": dict(fields or {}),
        "total_rows": report.total_rows,
        "valid_rows": report.valid_rows,
        "issues": [[i.row, i.reason] for i in report.issues],
        "truncated_rows": list(report.truncated_rows[:1000]),
        "n_truncated": len(report.truncated_rows),
        "stats": length_stats(examples),
        "lengths": lengths[:MAX_LENGTHS],
        "max_len": max_len,
        "previews": [preview(tokenizer, e) for e in examples[:PREVIEWS]],
    }
