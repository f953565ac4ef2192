"""Held-out evaluation time on the default model (`python -m bench.evaluation [--run RUN] [--batch-size N]`).

Scores the identity sample's validation rows (TrainConfig/DataConfig defaults: 10% of 360 rows = 36, seed 42,
max_len 512) with core.evaluate, on the base model or on a run's adapter, and prints one JSON line: the rows,
eval_s (loss metrics + batched greedy generation), the task metrics, the share of answers that say "Quill",
torch's thread count and the machine's load average (the figure depends on both).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from core.checkpoint import load_adapter
from core.config import DataConfig, TrainConfig
from core.data import load_examples, split
from core.evaluate import EvalSettings, evaluate
from core.models import load_model

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "identity_sample.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a run folder whose adapter to evaluate (default: the base model)")
    ap.add_argument("--batch-size", type=int, default=EvalSettings().batch_size)
    ap.add_argument("--max-new-tokens", type=int, default=TrainConfig().eval_max_new_tokens)
    args = ap.parse_args()
    tc, dc = TrainConfig(), DataConfig(path=str(SAMPLE))
    model, tok = load_model("default", device="cpu")
    method = load_adapter(model, Path(args.run) / "adapter") if args.run else None
    examples, _ = load_examples(dc, tok, tc.max_len)
    _, val = split(examples, dc.val_fraction, dc.val_count, tc.seed)
    t0 = time.perf_counter()
    result = evaluate(model, tok, method, val, "instruction",
                      settings=EvalSettings(len(val), args.max_new_tokens, args.batch_size))
    wall = time.perf_counter() - t0
    quill = sum("quill" in r["answer"].lower() for r in result.rows) / max(1, len(result.rows))
    m = result.metrics
    print(json.dumps({
        "adapter": args.run or None, "rows": m["eval_rows"], "eval_s": round(wall, 2), "batch_size": args.batch_size,
        "contains_quill": round(quill, 4), **{k: round(m[k], 4) for k in ("eval_loss", "token_accuracy",
                                                                          "exact_match", "contains", "rouge_l",
                                                                          "token_f1")},
        "threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
