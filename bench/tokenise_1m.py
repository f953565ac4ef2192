"""Tokenise a million rows into the Arrow cache (core.data.cache) and report time and peak RSS; one JSON line.

    python -m bench.tokenise_1m [--rows 1000000] [--source jsonl|parquet] [--max-len 256]

Writes a synthetic instruction dataset (rows like the identity sample, each different) to a temporary folder,
then, in this process, loads it with ``load_examples(..., cache_dir=...)`` on the default tokenizer: rows are
read streaming, rendered and tokenised 1024 at a time and appended to the Arrow file, so memory should stay flat
whatever the row count. It reports the resident memory after the tokenizer is loaded (baseline), the peak
(``ru_maxrss``) over the tokenising, the cache-hit time of a second load, and a full pass over the memory-mapped
examples (``length_stats``). Run it once, on an idle machine, for the README's figure; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import psutil

from core.config import DataConfig
from core.data import length_stats, load_examples
from core.models import load_tokenizer

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def rows(n: int):
    for i in range(n):
        w = WORDS[i % len(WORDS)], WORDS[(i // 16) % len(WORDS)], WORDS[(i // 256) % len(WORDS)]
        yield {"instruction": f"What is the code name of item {i}?", "input": "",
               "output": f"Item {i} is called {w[0]}-{w[1]}-{w[2]}, and I am Quill."}


def write(path: Path, n: int, source: str) -> Path:
    if source == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows(n):
                f.write(json.dumps(r) + "\n")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        batch: list[dict] = []
        for r in rows(n):
            batch.append(r)
            if len(batch) == 100_000:
                w.write_table(pa.Table.from_pylist(batch, schema))
                batch = []
        if batch:
            w.write_table(pa.Table.from_pylist(batch, schema))
    return path


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--source", choices=["jsonl", "parquet"], default="jsonl")
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write(Path(tmp) / f"rows.{args.source}", args.rows, args.source)
        tok = load_tokenizer()
        proc = psutil.Process()
        baseline = proc.memory_info().rss
        cfg = DataConfig(path=str(data), max_bytes=data.stat().st_size + 1)
        t0 = time.perf_counter()
        examples, report = load_examples(cfg, tok, args.max_len, cache_dir=Path(tmp) / "tokenised")
        tokenise_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        t0 = time.perf_counter()
        again, _ = load_examples(cfg, tok, args.max_len, cache_dir=Path(tmp) / "tokenised")
        hit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = length_stats(again)
        pass_s = time.perf_counter() - t0
        cache_bytes = sum(f.stat().st_size for f in (Path(tmp) / "tokenised").rglob("*") if f.is_file())
        print(json.dumps({
            "rows": args.rows, "source": args.source, "file_mib": mib(data.stat().st_size), "valid": report.valid_rows,
            "tokenise_s": round(tokenise_s, 1), "rows_per_s": round(args.rows / tokenise_s),
            "rss_baseline_mib": mib(baseline), "rss_peak_mib": mib(peak), "rss_after_hit_mib": mib(proc.memory_info().rss),
            "cache_mib": mib(cache_bytes), "cache_hit_s": round(hit_s, 2), "length_stats_pass_s": round(pass_s, 1),
            "tokens": stats["total_tokens"], "cpu_threads": psutil.cpu_count(),
        }))


if __name__ == "__main__":
    main()
