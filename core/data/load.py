"""Stage 5, load: a DataConfig in, the tokenised examples of every valid row and the report out.

``load_examples`` walks the rows with ``validate.Rows``, the same iterator ``validate_file`` uses, and renders
the usable ones in chunks through ``render.encode_many`` (one tokenizer call per chunk). A row is skipped
for the reason ``Rows`` gives, or, after rendering, because the chat template rejects it or nothing is left to
train once it is cut to ``max_len``; a truncated row that still trains something is kept and listed in
``DataReport.truncated_rows``. ``tokenise`` is that walk, one chunk at a time; with a ``cache_dir`` the chunks
are written to the tokenised cache (``cache``) as they come, and later loads read them back instead.
``length_stats`` and ``preview`` summarise the examples for ``inspect`` and the studio's Data tab.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config import DataConfig
from . import cache
from .render import IGNORE, Example, encode_many, n_trained
from .validate import DataReport, Rows


def load_examples(
    cfg: DataConfig, tokenizer: Any, max_len: int, chunk: int = 1024, cache_dir: str | Path | None = None
) -> tuple[Sequence[Example], DataReport]:
    """Tokenised examples of every valid row, and the report. Bad rows are reported, not fatal.

    With ``cache_dir`` the examples go through the tokenised cache (``core.data.cache``): a hit reads them back
    without tokenising; a miss writes them there chunk by chunk (bounded memory), then reads them back. Either
    way they are a memory-mapped sequence. Without ``cache_dir`` they are a list.
    DataError when the source cannot be read, its format cannot be detected, or no row is valid.
    """
    if cache_dir is not None:
        entry = Path(cache_dir) / cache.cache_key(cfg, tokenizer, max_len)
        hit = cache.read(entry, cfg.path)
        if hit is None:
            rows = Rows(cfg.path, cfg.format, cfg.fields, cfg.max_bytes, cfg.split, cfg.subset)
            report = rows.report()
            cache.write(entry, tokenise(rows, report, cfg, tokenizer, max_len, chunk), report)
            hit = cache.read(entry, cfg.path)
            if hit is None:
                raise OSError(f"the tokenised cache {entry} could not be read back")
        return hit
    rows = Rows(cfg.path, cfg.format, cfg.fields, cfg.max_bytes, cfg.split, cfg.subset)
    report = rows.report()
    examples = [e for part in tokenise(rows, report, cfg, tokenizer, max_len, chunk) for _, e in part]
    return examples, report


def tokenise(
    rows: Rows, report: DataReport, cfg: DataConfig, tokenizer: Any, max_len: int, chunk: int = 1024
) -> Iterator[list[tuple[int, Example]]]:
    """The (row, example) pairs of every usable row, ``chunk`` rows per tokenizer call and per yield, filling
    ``report`` on the way. At the end, DataError if no row was valid."""
    pending: list[tuple[int, list[dict] | str]] = []

    def flush() -> list[tuple[int, Example]]:
        done: list[tuple[int, Example]] = []
        results = encode_many(tokenizer, [item for _, item in pending], max_len, cfg.system_prompt)
        for (row, _), result in zip(pending, results):
            if isinstance(result, str):
                report.skip(row, result)
                continue
            example, truncated = result
            if n_trained(example) == 0:
                report.skip(row, f"longer than max_len={max_len} tokens, and nothing is left to train after truncation")
                continue
            if truncated:
                report.truncated_rows.append(row)
            report.valid_rows += 1
            done.append((row, example))
        pending.clear()
        return done

    for row, item, problem in rows:
        report.total_rows += 1
        if problem is not None:
            report.skip(row, problem)
        else:
            pending.append((row, item))
        if len(pending) >= chunk:
            yield flush()
    if pending:
        yield flush()
    report.issues.sort(key=lambda i: i.row)
    report.require_valid()


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


def length_stats(examples: Sequence[Example]) -> dict:
    """n, min, mean, p50, p90, max of the token lengths; total_tokens and supervised_tokens; shared_prefix, the
    leading tokens that every micro-batch runs once (``shared_prefix_length``)."""
    lengths = sorted(len(e.input_ids) for e in examples)
    n = len(lengths)
    if n == 0:
        return {"n": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "max": 0, "total_tokens": 0, "supervised_tokens": 0,
                "shared_prefix": 0}
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
        "shared_prefix": shared_prefix_length(examples),
    }


def shared_prefix_length(examples: Sequence[Example], chunk: int = 4096, width: int = 256) -> int:
    """The prompt prefix (a chat template's system prompt) that core.forward.shared_prefix finds in any batch of
    these examples: its smallest value over chunks of ``chunk`` rows (each with the first row too), each row cut
    to ``width`` tokens. 0 for fewer than two examples."""
    import torch

    from ..forward import shared_prefix  # the rule's one owner (core.forward imports the methods)

    if len(examples) < 2:
        return 0
    k = width
    for s in range(0, len(examples), chunk):
        rows = [examples[0], *examples[s : s + chunk]]
        m = min(width, *(len(e.input_ids) for e in rows))
        ids = torch.tensor([e.input_ids[:m] for e in rows], dtype=torch.int32)
        labels = torch.tensor([e.labels[:m] for e in rows], dtype=torch.int32)
        k = min(k, shared_prefix(ids, torch.ones_like(ids), labels))
    return k

