"""Datasets, as a pipeline of stages; each module takes what the one before it gives:

1. ``sources`` (``read`` for JSON files): a .json / .jsonl / .csv / .parquet file, a ``save_to_disk`` folder or a
   Hub dataset id -> (row number, JSON-like value, problem); file-level checks and size limits.
2. ``formats``: one row -> chat messages or text (format detection, field renaming, per-row reasons).
3. ``validate``: a file -> ``Rows``, the one row iterator (read + detect + check, yielding (row, messages or
   text, problem)), the ``DataReport`` of skipped rows, and ``validate_file`` (the fast check, no tokenizer).
4. ``render``: messages or text -> ``Example`` (chat template, token-exact label mask).
5. ``load``: a DataConfig -> the examples of every valid row and the report (``Rows`` + ``render``), through
   the tokenised Arrow cache (``cache``) when given a cache folder.
6. ``batching``: examples -> (train, val) split and length-grouped, padded ``Batch``es.

The fast check and the loader walk the same ``Rows``, so they skip the same rows for the same reasons.
Everything other code uses is re-exported here: ``from core.data import load_examples``.
"""

from __future__ import annotations

from .batching import Batch, LengthGroupedBatches, collate, split
from .formats import (
    DETECT_ROWS,
    EXPECTED,
    FIELD_NAMES,
    FORMAT_FIELDS,
    FORMATS,
    ROLES,
    check_fields,
    detect_format,
    to_messages,
)
from .cache import TOKENISED, CachedExamples
from .load import length_stats, load_examples, preview, shared_prefix_length, tokenise
from .read import DataError, iter_values, read_rows
from .sources import display_name, is_hub_id, iter_source
from .render import IGNORE, Example, chat_prompt, encode, encode_many, n_trained
from .validate import MAX_ISSUES, DataReport, Rows, RowIssue, validate_file

__all__ = [
    "Batch", "CachedExamples", "DETECT_ROWS", "DataError", "DataReport", "EXPECTED", "Example", "FIELD_NAMES", "FORMATS",
    "FORMAT_FIELDS", "IGNORE", "LengthGroupedBatches", "MAX_ISSUES", "ROLES", "TOKENISED", "RowIssue", "Rows", "chat_prompt",
    "check_fields", "collate", "detect_format", "display_name", "encode", "encode_many", "is_hub_id", "iter_source",
    "iter_values", "length_stats", "load_examples", "n_trained", "preview", "read_rows", "shared_prefix_length",
    "split", "to_messages", "tokenise", "validate_file",
]
