"""Stage 1, read (every source): a dataset location in, (row number, JSON-like value, problem) triples out.

``iter_source`` is what ``validate.Rows`` reads. The location (``DataConfig.path``) is one of:

=================== ============================================================ ===============================
source              read by                                                      row numbers
=================== ============================================================ ===============================
``.json``/``.jsonl`` ``read.iter_values`` (streamed; a bad line is a skipped row) line / array element, 1-based
``.csv``            ``datasets`` "csv" builder, streamed (empty cells stay "")   data row, 1-based (no header)
``.parquet``        ``datasets`` "parquet" builder, streamed                     row, 1-based
a folder            ``datasets.load_from_disk`` (``Dataset.save_to_disk``);       row, 1-based
                    a ``DatasetDict`` gives ``DataConfig.split``
a Hub id            ``datasets.load_dataset(id, subset, split=split)``           row, 1-based
=================== ============================================================ ===============================

JSON files keep their own reader: ``datasets``' JSON builder rejects a whole file at the first bad line, where
ours reports that line and goes on. Tabular sources hold every column in every row, ``None`` where a value is
missing; ``None`` values are dropped from the row (and from each message of a conversation), so a missing
cell reads as a missing field, exactly as in the JSON equivalent. File sources are size-checked against
``max_bytes`` before anything is read. Offline (``HF_HUB_OFFLINE=1``), a Hub id that is not in the local cache
raises ``DataError`` with one sentence naming it. ``fingerprint`` identifies a source's content, for the
tokenised cache (``core.data.cache``).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Iterator

from .read import DataError, iter_values

JSON_SUFFIXES = (".json", ".jsonl")
TABULAR = {".csv": "csv", ".parquet": "parquet"}
SUFFIXES = (*JSON_SUFFIXES, *TABULAR)
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
SPLIT = re.compile(r"[\w.-]+(\[[\w:%+-]*\])?")  # "train", "validation", "train[:90%]"
BATCH = 1000  # rows per Arrow batch read


def is_hub_id(path: str) -> bool:
    """A Hub dataset id ("owner/name" or "name"): nothing at that local path, no file suffix, id characters."""
    suffix = os.path.splitext(path)[1].lower()
    return suffix not in SUFFIXES and not os.path.exists(path) and bool(HUB_ID.fullmatch(path))


def source_kind(path: str) -> str:
    """'json', 'csv', 'parquet', 'disk' (a save_to_disk folder) or 'hub' (a Hub dataset id)."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS):
            return "disk"
        raise DataError(
            f"{display_name(path)} is a folder, but not one written by Dataset.save_to_disk; give a .json, .jsonl, "
            f".csv or .parquet file, or a Hugging Face Hub dataset id."
        )
    if is_hub_id(path):
        return "hub"
    return TABULAR.get(os.path.splitext(path)[1].lower(), "json")


def display_name(path: str) -> str:
    """How messages name the source: a Hub id whole, a file or folder by its base name."""
    return path if is_hub_id(path) else os.path.basename(os.path.normpath(path)) or path


def iter_source(
    path: str | os.PathLike, max_bytes: int, split: str = "train", subset: str = ""
) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row number, value, problem) for every row of the source (see the module docstring)."""
    path = os.fspath(path)
    kind = source_kind(path)
    if kind == "json":
        yield from iter_values(path, max_bytes)
        return
    rows = _dataset_rows(path, kind, max_bytes, split, subset)
    n = 0
    for n, value in enumerate(rows, 1):
        yield n, _drop_nulls(value), None
    if n == 0:
        raise DataError(f"{display_name(path)} contains no rows.")


def _dataset_rows(path: str, kind: str, max_bytes: int, split: str, subset: str) -> Iterator[dict]:
    import datasets  # imported here: the JSON path and the studio's start-up do not pay for it

    datasets.disable_progress_bars()
    name = display_name(path)
    if kind in ("csv", "parquet"):
        _check_size(path, name, os.path.getsize(path) if os.path.isfile(path) else None, max_bytes)
        extra = {"keep_default_na": False} if kind == "csv" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=path, split="train", streaming=True, **extra)
            yield from ds
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - pandas / pyarrow parse errors of every kind
            raise DataError(f"{name} could not be read as {kind.upper()}: {_first_line(e)}.") from None
        return
    if kind == "disk":
        _check_size(path, name, _folder_bytes(path), max_bytes)
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{name} could not be loaded with datasets.load_from_disk: {_first_line(e)}.") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name} has no split '{split}' (DataConfig.split); it has {', '.join(ds)}.")
            ds = ds[split]
        yield from _iter_dataset(ds)
        return
    yield from _iter_dataset(load_hub(path, split, subset))


def load_hub(repo_id: str, split: str, subset: str = "") -> Any:
    """The split of a Hub dataset (from the local cache when offline); DataError, one sentence naming it."""
    import datasets

    try:
        return datasets.load_dataset(repo_id, subset or None, split=split)
    except Exception as e:  # noqa: BLE001 - offline, not found, gated, bad split: all one sentence
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(
                f"The Hugging Face Hub dataset '{repo_id}' cannot be loaded offline (HF_HUB_OFFLINE=1) because it "
                f"is not in the local cache; download it once while online, or use a local file."
            ) from None
        raise DataError(
            f"The Hugging Face Hub dataset '{repo_id}' (split '{split}') could not be loaded: {_first_line(e)}."
        ) from None


def _iter_dataset(ds: Any) -> Iterator[dict]:
    """The rows of a (memory-mapped) Dataset, BATCH at a time: memory stays at one batch."""
    for batch in ds.iter(batch_size=BATCH):
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for i in range(n):
            yield {c: batch[c][i] for c in cols}


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _check_size(path: str, name: str, size: int | None, max_bytes: int) -> None:
    if size is None:
        raise DataError(f"Cannot read {name}: the file does not exist or is not accessible.")
    if size == 0:
        raise DataError(f"{name} is empty (0 bytes).")
    if size > max_bytes:
        raise DataError(
            f"{name} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.1f} MB limit (DataConfig.max_bytes)."
        )


def _folder_files(path: str) -> list[str]:
    out = []
    for root, _, files in os.walk(path):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(f) for f in _folder_files(path))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")[:300]


def fingerprint(path: str | os.PathLike, split: str = "train", subset: str = "") -> str:
    """A hex digest of the source's content: the file's bytes, every file of a folder, or a Hub split's own
    fingerprint (datasets computes it from the cached files)."""
    path = os.fspath(path)
    h = hashlib.blake2b(digest_size=16)
    kind = source_kind(path)
    if kind == "hub":
        ds = load_hub(path, split, subset)
        h.update(f"hub\0{path}\0{subset}\0{split}\0{ds._fingerprint}".encode())
        return h.hexdigest()
    files = _folder_files(path) if kind == "disk" else [path]
    h.update(f"{kind}\0{split if kind == 'disk' else ''}".encode())
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError:
            raise DataError(f"Cannot read {display_name(path)}: the file does not exist or is not accessible.") from None
    return h.hexdigest()
