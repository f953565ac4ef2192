"""The tokenised cache: a source's examples as an Arrow file, keyed by what decides them, read back memory-mapped.

Layout: ``<cache_dir>/<key>/examples.arrow`` (columns ``row`` int64, ``input_ids`` and ``labels`` list<int32>,
written as Arrow record batches one chunk at a time, so memory stays at one chunk however many rows there are)
beside ``report.json`` (the ``DataReport``: counts, skipped rows and reasons, truncated rows). Training passes
``<run>/tokenised``, so resume and evaluation read the run's own examples; the studio passes
``DATA/tokenised`` for the Data tab's preview.

``key`` is a digest of everything that decides the examples: the source's content (``sources.fingerprint``:
the file's bytes, so any change to the file invalidates it), format, column mapping, split, subset, system
prompt, max_len, the tokenizer (its vocabulary and rules, special tokens and chat template) and
``VERSION`` (bump it when rendering or masking changes). An entry is written into a temporary folder and renamed
into place, so a reader never sees half of one; of two writers racing for the same key, the first rename wins.

``CachedExamples`` is a read-only sequence of ``Example`` over the memory-mapped file (via
``datasets.Dataset.from_file``): a million examples cost no memory until they are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from .render import Example
from .sources import fingerprint
from .validate import DataReport, RowIssue

VERSION = 1
TOKENISED = "tokenised"  # the cache folder inside a run folder
ARROW = "examples.arrow"
REPORT = "report.json"
READ_BATCH = 1024

_TOKENIZER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_key(tokenizer: Any) -> str:
    """A digest of what decides a tokenizer's output: its full definition (fast tokenizers serialise it), its
    special tokens and its chat template."""
    try:
        return _TOKENIZER_KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    key = h.hexdigest()
    try:
        _TOKENIZER_KEYS[tokenizer] = key
    except TypeError:
        pass
    return key


def cache_key(cfg: Any, tokenizer: Any, max_len: int) -> str:
    """The cache entry's name for a DataConfig, a tokenizer and max_len (see the module docstring)."""
    parts = {
        "version": VERSION,
        "source": fingerprint(cfg.path, cfg.split, cfg.subset),
        "format": cfg.format,
        "fields": sorted(cfg.fields.items()),
        "split": cfg.split,
        "subset": cfg.subset,
        "system_prompt": cfg.system_prompt,
        "max_len": max_len,
        "tokenizer": tokenizer_key(tokenizer),
    }
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=12).hexdigest()


def read(entry: Path, path: str) -> tuple[CachedExamples, DataReport] | None:
    """The cached examples and report of an entry, or None when there is none (or it is unreadable)."""
    try:
        saved = json.loads((entry / REPORT).read_text(encoding="utf-8"))
        examples = CachedExamples(entry / ARROW)
    except (OSError, ValueError, KeyError):
        return None
    issues = [RowIssue(int(r), str(why)) for r, why in saved["issues"]]
    report = DataReport(path, saved["format"], int(saved["total_rows"]), int(saved["valid_rows"]), issues,
                        [int(r) for r in saved["truncated_rows"]])
    return examples, report


def write(entry: Path, chunks: Iterator[list[tuple[int, Example]]], report: DataReport) -> None:
    """Write ``chunks`` of (row, example) to a new entry, then the report (filled while ``chunks`` ran).
    The entry appears whole or not at all."""
    import pyarrow as pa

    schema = pa.schema([("row", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        with pa.OSFile(str(tmp / ARROW), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for chunk in chunks:
                if not chunk:
                    continue
                writer.write_batch(pa.record_batch([
                    pa.array([r for r, _ in chunk], pa.int64()),
                    pa.array([e.input_ids for _, e in chunk], pa.list_(pa.int32())),
                    pa.array([e.labels for _, e in chunk], pa.list_(pa.int32())),
                ], schema=schema))
        saved = asdict(report)
        saved["issues"] = [[i.row, i.reason] for i in report.issues]
        (tmp / REPORT).write_text(json.dumps(saved), encoding="utf-8")
        try:
            os.replace(tmp, entry)
        except OSError:  # another writer got there first: theirs is the same data
            if not (entry / REPORT).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CachedExamples(Sequence):
    """The examples of a cache entry, memory-mapped; ``examples[i]`` is an ``Example``, slices give lists."""

    def __init__(self, arrow_file: Path):
        from datasets import Dataset

        self._ds = Dataset.from_file(str(arrow_file))
        self.path = Path(arrow_file)

    def __len__(self) -> int:
        return self._ds.num_rows

    def __getitem__(self, i):  # noqa: ANN001 - int or slice, as list
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = self._ds[i]
        return Example(row["input_ids"], row["labels"])

    def __iter__(self) -> Iterator[Example]:
        for batch in self._ds.iter(batch_size=READ_BATCH):
            yield from (Example(ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"]))

    def rows(self) -> list[int]:
        """The source row number of every example."""
        return self._ds["row"]
