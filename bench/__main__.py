"""`make bench [QUICK=1]`: every case, ours vs transformers.Trainer + peft, each side in its own process.

Writes bench/results.json and prints a markdown table. QUICK=1 uses fewer examples (fits 15 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import CASES

OUT = Path(__file__).parent / "results.json"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import os

    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}"


def run_side(case: str, side: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.one", "--case", case, "--side", side] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"{case}/{side} failed:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: dict) -> str:
    rows = ["| case | ours wall s | peer wall s | speedup | ours tok/s | peer tok/s | mem ours/peer MB | mem ratio "
            "| eval loss ours / peer | loss delta |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        o, p = c["ours"], c["peer"]
        rows.append(
            f"| {c['name']} | {o['wall_s']:.1f} | {p['wall_s']:.1f} | {c['speedup']:.2f}x | {o['tokens_per_s']:.0f} | "
            f"{p['tokens_per_s']:.0f} | {o['peak_mem_mb']:.0f} / {p['peak_mem_mb']:.0f} | {c['mem_ratio']:.2f} | "
            f"{o['eval_loss']:.4f} / {p['eval_loss']:.4f} | {c['loss_delta_pct']:+.2f}% |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="fewer examples; fits 15 min on 2 CPU cores")
    ap.add_argument("--cases", nargs="*", default=[c.name for c in CASES])
    args = ap.parse_args()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "cases": []}
    for name in args.cases:
        ours, peer = run_side(name, "ours", args.quick), run_side(name, "peer", args.quick)
        print(f"{name}: ours {ours['wall_s']:.1f}s, peer {peer['wall_s']:.1f}s", flush=True)
        results["cases"].append({
            "name": name, "ours": ours, "peer": peer,
            "speedup": peer["wall_s"] / ours["wall_s"],
            "mem_ratio": ours["peak_mem_mb"] / peer["peak_mem_mb"],
            "loss_delta_pct": 100 * (ours["eval_loss"] - peer["eval_loss"]) / peer["eval_loss"],
        })
        OUT.write_text(json.dumps(results, indent=2))
    print(f"\nMachine: {results['machine']} ({results['date']}{', quick' if args.quick else ''})\n")
    print(table(results))


if __name__ == "__main__":
    main()
