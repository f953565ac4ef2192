"""Stage 3, validate: a source (``sources``: a file, a datasets folder or a Hub id) in, every row checked (row number, messages or text, or the problem) out.

``Rows`` is the one row iterator: it reads the file (``read``), detects the format from the first DETECT_ROWS
rows unless one is given, and turns each row into chat messages or text (``formats.to_messages``), yielding
``(row, item, None)`` for a usable row and ``(row, None, reason)`` for a skipped one. Both the fast check
(``validate_file``: ``inspect --quick``) and training's loader (``load.load_examples``: ``inspect``, the studio's
Data tab, ``train``) walk the rows through it, so they skip the same rows for the same reasons; the loader can
only skip more, for what needs the tokenizer (a template that rejects the row, nothing left to train after
truncation).

``DataReport`` is the skipped-row report: counts, the first MAX_ISSUES (row, reason) pairs and the rows cut to
``max_len``. ``validate_file`` never tokenises and keeps only the report, so a million streamed rows take seconds
and little memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Iterator

from .formats import DETECT_ROWS, check_fields, describe, detect_format, to_messages
from .read import DataError
from .sources import display_name, iter_source

MAX_ISSUES = 1000  # issues kept in a report; the count of invalid rows is always total_rows - valid_rows
MAX_BYTES = 200 * 1024 * 1024  # default file size limit (DataConfig.max_bytes has its own default)


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

    def skip(self, row: int, reason: str) -> None:
        """Record a skipped row (only the first MAX_ISSUES reasons are kept; invalid_rows counts them all)."""
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(RowIssue(row, reason))

    def summary(self, max_issues: int = 5) -> str:
        name = display_name(self.path)
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

    def require_valid(self) -> None:
        """DataError naming the format and the first problems when no row is valid."""
        if self.valid_rows:
            return
        name = display_name(self.path)
        first = "; ".join(f"row {i.row}: {i.reason}" for i in self.issues[:3])
        raise DataError(
            f"{name} has no valid rows for the {self.format} format (expected {describe(self.format)}); "
            f"first problems: {first}."
        )


class Rows:
    """The checked rows of one file, read once: iterate for (row, messages or text, None) or (row, None, reason).

    Construction reads the first DETECT_ROWS rows and fixes ``format`` (``fmt``, or detected when "auto"), so
    file-level problems and an undetectable format raise DataError here, before any row is yielded; a file
    problem found later (a streamed array broken near its end) raises DataError during iteration.
    """

    def __init__(
        self, path: str | os.PathLike, fmt: str = "auto", fields: dict[str, str] | None = None,
        max_bytes: int = MAX_BYTES, split: str = "train", subset: str = "",
    ):
        check_fields(fields)
        self.path = os.fspath(path)
        self.fields = fields
        self._rest = iter_source(path, max_bytes, split, subset)
        self._head = list(islice(self._rest, DETECT_ROWS))  # the first rows decide the format
        self.format = fmt if fmt != "auto" else detect_format((v for _, v, p in self._head if p is None), fields)
        self._used = False

    def report(self) -> DataReport:
        """An empty report for this file and format, to be filled while iterating."""
        return DataReport(self.path, self.format, 0, 0, [], [])

    def __iter__(self) -> Iterator[tuple[int, Any, str | None]]:
        if self._used:
            raise RuntimeError("Rows can be iterated only once (the file is streamed)")
        self._used = True
        head, self._head = self._head, []
        fmt, fields = self.format, self.fields
        for row, value, problem in chain(head, self._rest):
            if problem is not None:
                yield row, None, problem
                continue
            try:
                item = to_messages(value, fmt, fields)
            except DataError as e:
                yield row, None, str(e)
                continue
            yield row, item, None


def validate_file(
    path: str | os.PathLike,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    max_bytes: int = MAX_BYTES,
    split: str = "train",
    subset: str = "",
) -> DataReport:
    """Read, detect and validate every row without tokenising (fast: the upload check).

    Streams the file; keeps only counts and the first MAX_ISSUES issues. DataError if no row is valid.
    """
    rows = Rows(path, fmt, fields, max_bytes, split, subset)
    report = rows.report()
    for row, _, problem in rows:
        report.total_rows += 1
        if problem is None:
            report.valid_rows += 1
        else:
            report.skip(row, problem)
    report.require_valid()
    return report
